"""kneeoa: reproduce and audit the knee-radiograph OA feature study, end to end."""

__version__ = "0.1.0"
