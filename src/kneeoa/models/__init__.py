"""Model families: supervised CNN backbones (`cnn`) and frozen foundation-model encoders (`foundation`)."""
