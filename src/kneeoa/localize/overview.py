"""A film's localisation overview: the film reduced to OVERVIEW_PX wide, each found knee's crop square drawn and
labelled with side and confidence, missed sides labelled "quarantined". `kneeoa localize` writes one per film and
`prepare` one per sampled film for the data report.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OVERVIEW_PX = 800


def draw_overview(image: np.ndarray, spacing_mm: tuple[float, float], knees: dict[str, tuple[float, float, float]],
                  missed: dict[str, str], *, crop_mm: float, bilateral: bool) -> Image.Image:
    """The film reduced to OVERVIEW_PX wide (RGB), with found knees boxed in green and missed sides named in red.

    Args:
        image: (H, W) float in [0, 1].
        knees: side -> (row_px, col_px, confidence) in film pixels.
        missed: side -> reason.
        crop_mm: side of the box drawn around each knee.
        bilateral: missed sides are labelled in their half (R image-left), else at the top.
    """
    scale = OVERVIEW_PX / image.shape[1]
    small = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).resize(
        (OVERVIEW_PX, max(1, round(image.shape[0] * scale))), Image.BOX).convert("RGB")
    draw = ImageDraw.Draw(small)
    font = ImageFont.load_default(size=18)
    for side, (row, col, conf) in knees.items():
        hr, hc = crop_mm / 2 / spacing_mm[0] * scale, crop_mm / 2 / spacing_mm[1] * scale
        r, c = row * scale, col * scale
        draw.rectangle([c - hc, r - hr, c + hc, r + hr], outline=(0, 220, 0), width=3)
        draw.ellipse([c - 4, r - 4, c + 4, r + 4], fill=(0, 220, 0))
        draw.text((c - hc + 4, r - hr + 4), f"{side} {conf:.2f}", fill=(0, 220, 0), font=font)
    for side in missed:
        x = (OVERVIEW_PX * (0.05 if side == "R" else 0.55)) if bilateral else OVERVIEW_PX * 0.05
        draw.text((x, small.height / 2), f"{side}: quarantined", fill=(230, 0, 0), font=font)
    return small
