"""Data in: importers that each produce the one validated manifest, and the image helpers they share."""
