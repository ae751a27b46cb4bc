"""Reading and writing knee crops: 8- or 16-bit grayscale PNG in, float32 in [0, 1] out."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from kneeoa.errors import DataError
from kneeoa.io import atomic_path

#: Largest image accepted, in pixels; the environment variable KNEEOA_MAX_IMAGE_PIXELS changes it. A bilateral
#: film at 0.1 mm is about 20 Mpx. PIL refuses images over twice its MAX_IMAGE_PIXELS (a decompression bomb) and
#: warns between once and twice, so it is set to half the limit and its warning silenced.
MAX_IMAGE_PIXELS = int(os.environ.get("KNEEOA_MAX_IMAGE_PIXELS", 100_000_000))
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS // 2
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def too_large(path: Path, e: Exception) -> DataError:
    """The error for an image over MAX_IMAGE_PIXELS (PIL's DecompressionBombError)."""
    return DataError(f"Image {path} is larger than {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx, the limit for one image "
                     f"({e}); set KNEEOA_MAX_IMAGE_PIXELS to allow more.")


def load_gray(path: Path) -> np.ndarray:
    """A grayscale crop as float32 (H, W) in [0, 1], whatever its bit depth (8-bit, 16-bit, RGB -> luminance)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                scale = 65535.0 if arr.max() > 255 or im.mode.startswith("I;16") else 255.0
                return np.clip(arr / scale, 0, 1)
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except FileNotFoundError as e:
        raise DataError(f"Image {path} does not exist. Check the manifest's image_path or re-run prepare.") from e
    except Image.DecompressionBombError as e:
        raise too_large(path, e) from e
    except (OSError, ValueError) as e:
        raise DataError(f"Image {path} cannot be read as an image ({e}). Replace or remove it.") from e


def save_gray16(img: np.ndarray, path: Path) -> Path:
    """Write a float image in [0, 1] as a 16-bit grayscale PNG, atomically."""
    arr = np.clip(np.asarray(img, dtype=np.float64), 0, 1)
    with atomic_path(Path(path)) as tmp:
        Image.fromarray((arr * 65535 + 0.5).astype(np.uint16)).save(tmp, format="PNG")
    return Path(path)


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Square resize of a float (H, W) image with antialiasing (PIL, float mode)."""
    if img.shape == (size, size):
        return img
    return np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((size, size), Image.BICUBIC),
                      dtype=np.float32).clip(0, 1)
