"""Phantom acquisition: patient positioning, exposure, detector blur and noise, and deliberate low-quality faults.

A `quality` dict describes one acquisition (keys and neutral values in `NEUTRAL_QUALITY`). Routine images get small
random positioning (rotation within 4 degrees, magnification within 6 %, shift within a few mm), exposure, blur and
noise. A low-quality image also gets one fault from the `DEGRADATIONS` registry at a severity in [0.3, 1]:

- noise: heavy quantum noise;  blur: strong unsharpness;  motion: the knee moved during exposure (directional smear);
- underexposed: too few photons, so the image is flat, pale and grainy (bone bright is MONOCHROME2);
- overexposed: burned out, so soft tissue vanishes and bone turns grey;
- clipped: a too-narrow display window saturates bone to white and soft tissue to black.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage

from kneeoa.errors import ConfigError
from kneeoa.registry import Registry

#: Every key a quality dict may hold, with the value that leaves the image untouched (blur and noise: a clean detector).
NEUTRAL_QUALITY: dict[str, Any] = {
    "rotation_deg": 0.0,  # in-plane rotation of the knee, counter-clockwise on screen
    "scale": 1.0,  # geometric magnification
    "shift_mm": (0.0, 0.0),  # (down, right) displacement of the knee on the detector
    "gamma": 1.0,  # exposure curve: img ** gamma
    "contrast": 1.0,  # gain about mid-grey
    "brightness": 0.0,  # offset
    "blur_mm": 0.3,  # Gaussian detector unsharpness (sigma, mm)
    "noise_sd": 0.01,  # additive noise standard deviation (image units)
    "degradation": None,  # a DEGRADATIONS name for a deliberately low-quality image
    "severity": 0.0,  # 0-1, strength of the degradation
}

Degradation = Callable[[np.ndarray, float, np.random.Generator, float], np.ndarray]
DEGRADATIONS: Registry[Degradation] = Registry("degradation")


def _noise(img: np.ndarray, severity: float, rng: np.random.Generator, px_mm: float) -> np.ndarray:
    return img + rng.normal(0.0, 0.07 + 0.08 * severity, img.shape)


def _blur(img: np.ndarray, severity: float, rng: np.random.Generator, px_mm: float) -> np.ndarray:
    return ndimage.gaussian_filter(img, (1.5 + 1.5 * severity) / px_mm)


def _motion(img: np.ndarray, severity: float, rng: np.random.Generator, px_mm: float) -> np.ndarray:
    length = max(3, round((5.0 + 7.0 * severity) / px_mm))
    return ndimage.uniform_filter1d(img, length, axis=int(rng.integers(0, 2)))


def _underexposed(img: np.ndarray, severity: float, rng: np.random.Generator, px_mm: float) -> np.ndarray:
    keep = 0.45 - 0.25 * severity
    return 1.0 - (1.0 - img) * keep + rng.normal(0.0, 0.03 + 0.04 * severity, img.shape)


def _overexposed(img: np.ndarray, severity: float, rng: np.random.Generator, px_mm: float) -> np.ndarray:
    floor = 0.3 + 0.2 * severity
    return np.clip(img - floor, 0.0, None) * (0.6 - 0.2 * severity)


def _clipped(img: np.ndarray, severity: float, rng: np.random.Generator, px_mm: float) -> np.ndarray:
    lo = 0.4 + 0.15 * severity
    return (img - lo) / (0.3 - 0.15 * severity)


DEGRADATIONS.add("noise", _noise)
DEGRADATIONS.add("blur", _blur)
DEGRADATIONS.add("motion", _motion)
DEGRADATIONS.add("underexposed", _underexposed)
DEGRADATIONS.add("overexposed", _overexposed)
DEGRADATIONS.add("clipped", _clipped)


def sample_quality(rng: np.random.Generator, *, low_quality: bool = False) -> dict[str, Any]:
    """Draw one acquisition: routine positioning and exposure, plus one random fault when `low_quality`."""
    quality = {
        "rotation_deg": float(rng.uniform(-4.0, 4.0)),
        "scale": float(rng.uniform(0.94, 1.06)),
        "shift_mm": (float(rng.normal(0.0, 2.5)), float(rng.normal(0.0, 2.5))),
        "gamma": float(rng.uniform(0.85, 1.15)),
        "contrast": float(rng.uniform(0.9, 1.1)),
        "brightness": float(rng.uniform(-0.04, 0.04)),
        "blur_mm": float(rng.uniform(0.2, 0.45)),
        "noise_sd": float(rng.uniform(0.008, 0.02)),
        "degradation": None,
        "severity": 0.0,
    }
    if low_quality:
        names = DEGRADATIONS.names()
        quality["degradation"] = names[int(rng.integers(0, len(names)))]
        quality["severity"] = float(rng.uniform(0.3, 1.0))
    return quality


def resolve_quality(quality: dict[str, Any] | None, rng: np.random.Generator) -> dict[str, Any]:
    """A complete quality dict: None draws a routine acquisition; a partial dict is completed with neutral values."""
    if quality is None:
        return sample_quality(rng)
    unknown = sorted(set(quality) - set(NEUTRAL_QUALITY))
    if unknown:
        raise ConfigError(f"Unknown quality key(s) {unknown}. Valid keys: {', '.join(NEUTRAL_QUALITY)}.")
    full = {**NEUTRAL_QUALITY, **quality}
    if full["degradation"] is not None:
        DEGRADATIONS.get(full["degradation"])  # fails with the valid names
    if not 0.0 <= float(full["severity"]) <= 1.0:
        raise ConfigError(f"quality 'severity' must be between 0 and 1. Got {full['severity']!r}.")
    if not float(full["scale"]) > 0:
        raise ConfigError(f"quality 'scale' must be positive. Got {full['scale']!r}.")
    return full


def expose(img: np.ndarray, quality: dict[str, Any], rng: np.random.Generator, px_mm: float) -> np.ndarray:
    """Apply exposure, detector blur, noise and the fault of `quality` to an ideal image; returns float32 in [0, 1]."""
    out = np.clip(img, 0.0, 1.0) ** quality["gamma"]
    out = (out - 0.5) * quality["contrast"] + 0.5 + quality["brightness"]
    if quality["blur_mm"] > 0:
        out = ndimage.gaussian_filter(out, quality["blur_mm"] / px_mm)
    out = out + rng.standard_normal(out.shape, np.float32) * np.float32(quality["noise_sd"]) * (0.5 + out)
    if quality["degradation"] is not None:
        out = DEGRADATIONS.get(quality["degradation"])(out, float(quality["severity"]), rng, px_mm)
    return np.clip(out, 0.0, 1.0).astype(np.float32)
