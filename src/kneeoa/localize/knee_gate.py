"""The model-free half of the knee check: what a file's DICOM tags and an image's plain statistics already say.

A file is refused here, before any model sees it, when it says it is not a PA knee radiograph:

- **tags** (DICOM only, read from the header before any pixel is decoded): a `Modality` that is not a projection
  radiograph (CT, MR, NM, US, RT objects, SR, ...), a `BodyPartExamined` naming another body part, or a
  `ViewPosition` that is not frontal (lateral, oblique, axial ...). A missing tag refuses nothing: tags are often
  absent or wrong, so the image check (`kneeoa.models.knee_check`) runs on everything these rules let through.
- **pixels** (any crop): smaller than `MIN_SIDE_PX` a side, a colour image (photographs, screenshots), or flat.

Each rule answers with the reason (a sentence that names what was found) or None; `kneeoa predict`, `serve` and
`prepare` write that reason where a grade would have been.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

#: Modality values of projection radiographs (DICOM PS3.3 C.7.3.1.1.1; DR and RG for older archives).
#: OT (other) and a missing Modality are left to the image check: secondary captures of films use them.
RADIOGRAPH_MODALITIES = {"CR", "DX", "DR", "RG"}
#: Modalities that may hold anything; the image check decides.
UNSPECIFIC_MODALITIES = {"", "OT"}
#: BodyPartExamined values a knee film may carry (DICOM PS3.16 CID 4031 and common vendor spellings).
KNEE_BODY_PARTS = {"KNEE", "LEG", "LOWER LIMB", "LOWER EXTREMITY", "LOWEXTREMITY", "EXTREMITY", "LOWER_LIMB"}
#: ViewPosition values of a frontal knee view (PA fixed-flexion, as in OAI, or AP standing).
FRONTAL_VIEWS = {"", "PA", "AP"}
#: A crop smaller than this (pixels, shorter side) holds too little detail to grade a joint space.
MIN_SIDE_PX = 64
#: Mean absolute difference between colour channels (0-1 scale) above which an image is a colour picture.
COLOUR_SPREAD = 0.02
#: Grey-level standard deviation (0-1 scale) below which an image holds no structure at all.
FLAT_STD = 0.01


def _tag(header: Mapping, name: str) -> str:
    return str(header.get(name, "") or "").strip().upper()


def tag_reason(header) -> str | None:
    """Why a DICOM header says this is not a frontal knee radiograph, or None when nothing says so.

    Args:
        header: a pydicom Dataset (read with `stop_before_pixels`) or a mapping of tag keyword -> value.
    """
    modality = _tag(header, "Modality")
    if modality not in RADIOGRAPH_MODALITIES | UNSPECIFIC_MODALITIES:
        return (f"Modality is {modality!r}, not a projection radiograph (CR, DX); kneeoa grades knee radiographs "
                "only")
    part = _tag(header, "BodyPartExamined")
    if part and part not in KNEE_BODY_PARTS:
        return f"BodyPartExamined is {part!r}, not a knee"
    view = _tag(header, "ViewPosition")
    if view not in FRONTAL_VIEWS:
        return f"ViewPosition is {view!r}, not a frontal (PA or AP) view; lateral and other views are not graded"
    return None


def colour_spread(path: Path) -> float:
    """Mean absolute difference between an image file's colour channels, on a 0-1 scale (0 for grey images).

    Only PNG and JPEG files in a colour mode are decoded; a thumbnail of at most 256 px is enough.
    """
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV", "PA"):
            return 0.0
        im.draft("RGB", (256, 256))
        rgb = np.asarray(im.convert("RGB").resize((min(im.width, 256), min(im.height, 256))), dtype=np.float32)
    rgb /= 255.0
    return float(np.mean(np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])) / 2)


def file_reason(path: Path) -> str | None:
    """Why a PNG or JPEG file is not a radiograph by its pixels' colour, or None (read_dicom refuses colour DICOM
    itself)."""
    from PIL import Image

    from kneeoa.formats.images import too_large

    try:
        spread = colour_spread(path)
    except Image.DecompressionBombError as e:
        raise too_large(path, e) from e
    except OSError:
        return None  # an unreadable file is reported by the decoder with its own reason
    if spread > COLOUR_SPREAD:
        return (f"a colour image (channels differ by {spread:.3f} on average), not a radiograph; radiographs are "
                "grayscale")
    return None


def image_reason(image: np.ndarray) -> str | None:
    """Why a decoded image (float, [0, 1]) cannot be a knee radiograph by its size or contrast, or None."""
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE_PX:
        return f"image is {w}x{h} px; a knee needs at least {MIN_SIDE_PX} px a side to be graded"
    std = float(np.asarray(image, dtype=np.float32)[::2, ::2].std())
    if std < FLAT_STD:
        return f"a flat image (grey-level spread {std:.4f}): no anatomy to grade"
    return None
