"""What an image goes through on its way into a model: preprocessing, augmentation, the decoded cache."""
