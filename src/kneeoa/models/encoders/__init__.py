"""Frozen encoders: the registry, the libraries that load them, zero-shot, device."""
