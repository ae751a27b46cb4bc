"""Data sources: importers, the manifest they all produce, and patient-level splits."""
