"""Synthetic knees: the phantom generator and films composed from real crops."""
