"""Supervised CNNs: backbones, task heads, inference, resume, self-supervised pieces."""
