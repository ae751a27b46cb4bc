"""Image file formats in: DICOM, PNG crops, and the process pool that reads many files."""
