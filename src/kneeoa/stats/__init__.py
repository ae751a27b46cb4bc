"""Statistics: point metrics, their weighted forms, the patient bootstrap, paired tests, calibration."""
