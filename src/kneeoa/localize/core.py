"""Finding knee joints on radiographs and cutting physically sized crops around them.

A bilateral PA fixed-flexion film shows two legs as bright vertical bands on a dark background; each knee joint is
the dark horizontal gap between the bright femoral condyles above and the bright tibial plateau below. The classical
"profile" localiser reads exactly that, on a copy of the film resampled to 1 mm pixels so every threshold is in mm:

1. column profile of each half of the film -> the leg band (its brightest column);
2. row profile of a condyle-wide strip of that band -> the joint line, the row whose 6-25 mm neighbourhoods above
   and below are both much brighter than the row itself (a narrow gap between two tall bones, which rib spaces,
   lung fields and film edges are not);
3. horizontal extent of bone just above and below the joint line -> the joint centre column, then step 2 again
   in a strip centred there.

Sides: on a PA film the patient faces the detector, so the patient's RIGHT knee is on the image LEFT. Films are
assumed to be displayed in that standard orientation; burned-in "R"/"L" markers are not read (they do not disturb
the profiles: they are small). A film displayed mirrored would get its sides swapped, which no pixel test here can
detect: check the markers of a sample of crops when importing a new archive.

A film is never cropped wrong silently: one leg found, a weak joint gap, knees at an implausible distance or
height difference, or bone of implausible width raise `LocalizationError` with the reason, and importers put the
film in quarantine with it. `LOCALIZERS` holds localisers by name: "profile" (this classical one, excellent on
phantom films but blind to many real joint spaces, which are narrower and fainter) and "heatmap" (the learned one in
`kneeoa.localize.heatmap`, the default, measured on films composed from real knees). A localiser that finds
some knees of a film but not others raises `KneesMissing`, so the knees it did find are still cropped and each
missed one is reported with its own reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter1d

from kneeoa.errors import DataError
from kneeoa.formats.images import resize
from kneeoa.registry import Registry

_logger = logging.getLogger(__name__)

WORK_MM = 1.0  # resolution the profile localiser works at


class LocalizationError(DataError):
    """No plausible knee joint(s) on a film; the message is the quarantine reason."""


@dataclass(frozen=True)
class KneeLocation:
    """One knee joint found on a film.

    Attributes:
        row_px, col_px: joint centre in the film's pixel coordinates (row down, column right).
        score: the localiser's own measure: profile, joint-gap contrast (flanking bone - gap) / (flanking bone -
            background), 0-1; heatmap, the peak heat.
        bone_width_mm: width of bone at the joint line (NaN where the localiser does not measure it).
        confidence: 0-1, how sure the localiser is that this is a knee joint centre; knees below the localiser's
            threshold are never returned as found.
    """

    row_px: float
    col_px: float
    score: float
    bone_width_mm: float
    confidence: float = float("nan")


class KneesMissing(LocalizationError):
    """Some knees of a film were found, others not: the found ones can still be cropped.

    Attributes:
        knees: image-left to image-right, a KneeLocation or None (not found).
        reasons: same order, None for a found knee, else why it was not.
    """

    def __init__(self, knees: list[KneeLocation | None], reasons: list[str | None]) -> None:
        self.knees, self.reasons = knees, reasons
        super().__init__("; ".join(r for r in reasons if r))


@dataclass(frozen=True)
class ProfileLimits:
    """Plausibility limits of the profile localiser (mm, or fractions of the film's grey range)."""

    min_leg_contrast: float = 0.06  # leg band above background
    min_joint_score: float = 0.06  # joint gap depth relative to the bone beside it (bone-on-bone KL4: ~0.13)
    gap_mm: float = 6.0  # flanks start this far from the joint line
    flank_mm: float = 25.0  # ... and end this far
    strip_mm: float = 35.0  # half-width of the strip whose rows are averaged
    bone_width_mm: tuple[float, float] = (55.0, 140.0)  # bone extent at the joint line
    knee_distance_mm: tuple[float, float] = (110.0, 420.0)  # between the two joint centres
    max_height_diff_mm: float = 50.0  # between the two joint lines
    edge_margin_mm: float = 20.0  # joint lines this close to the top or bottom edge are not trusted


LIMITS = ProfileLimits()


def to_work(image: np.ndarray, spacing_mm: tuple[float, float], work_mm: float = WORK_MM
            ) -> tuple[np.ndarray, float, float]:
    """Resample to `work_mm` pixels (box filter); returns the image and the row/column scale back to film pixels."""
    h, w = image.shape
    out_h, out_w = max(1, round(h * spacing_mm[0] / work_mm)), max(1, round(w * spacing_mm[1] / work_mm))
    small = np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize((out_w, out_h), Image.BOX))
    return small, h / out_h, w / out_w


def _joint_row(work: np.ndarray, col: float, bg: float, lim: ProfileLimits) -> tuple[int, float]:
    """Best joint-line row in a strip around `col` and its gap score (0 when none qualifies)."""
    h, w = work.shape
    c0, c1 = max(0, int(col - lim.strip_mm)), min(w, int(col + lim.strip_mm) + 1)
    prof = gaussian_filter1d(work[:, c0:c1].mean(axis=1), 1.0)
    d0, d1 = int(lim.gap_mm), int(lim.flank_mm)
    cum = np.concatenate([[0.0], np.cumsum(prof)])
    rows = np.arange(max(d1, int(lim.edge_margin_mm)), min(h - d1, h - int(lim.edge_margin_mm)))
    if len(rows) == 0:
        return 0, 0.0
    above = (cum[rows - d0] - cum[rows - d1]) / (d1 - d0)
    below = (cum[rows + d1] - cum[rows + d0]) / (d1 - d0)
    flank = np.minimum(above, below)
    gap = prof[rows]
    score = (flank - gap) / np.maximum(flank - bg, 1e-3)
    score[flank - bg < lim.min_leg_contrast] = 0.0
    best = int(np.argmax(score))
    return int(rows[best]), float(max(score[best], 0.0))


def _bone_extent(work: np.ndarray, row: int, col: float, bounds: tuple[int, int], bg: float,
                 lim: ProfileLimits) -> tuple[float, float]:
    """Centre column and width (mm) of the bone crossing `col` just above and below the joint line.

    The bone is the run of columns, within `bounds` (this knee's part of the film), brighter than half-way between
    background and the brightest column within half a maximal knee width of `col`.
    """
    h = work.shape[0]
    r0, r1 = max(0, row - int(lim.flank_mm)), min(h, row + int(lim.flank_mm) + 1)
    band = np.concatenate([work[r0:max(r0, row - int(lim.gap_mm))], work[row + int(lim.gap_mm):r1]])
    prof = gaussian_filter1d(band[:, bounds[0]:bounds[1]].mean(axis=0), 2.0)
    reach = int(lim.bone_width_mm[1] / 2)
    c = int(np.clip(round(col) - bounds[0], 0, len(prof) - 1))
    lo, hi = max(0, c - reach), min(len(prof), c + reach + 1)
    c = lo + int(np.argmax(prof[lo:hi]))
    above = prof >= bg + 0.5 * (prof[c] - bg)
    left, right = c, c
    while left > 0 and above[left - 1]:
        left -= 1
    while right < len(prof) - 1 and above[right + 1]:
        right += 1
    return bounds[0] + (left + right) / 2.0, float(right - left + 1)


def _find_knee(work: np.ndarray, c_lo: int, c_hi: int, bg: float, lim: ProfileLimits, where: str) -> KneeLocation:
    """The knee in columns [c_lo, c_hi) of the work image (coordinates in work pixels)."""
    cols = gaussian_filter1d(work[:, c_lo:c_hi].mean(axis=0), 8.0)
    col = c_lo + float(np.argmax(cols))
    if cols.max() - bg < lim.min_leg_contrast:
        raise LocalizationError(f"no leg found in the {where} (the brightest band is only "
                                f"{cols.max() - bg:.2f} above background; low-contrast or empty film)")
    # The first joint-line estimate sits on the leg's brightest column, which may be off the joint centre: it is
    # only refused when nothing gap-like exists; the contrast limit applies after refining the column.
    row, score = _joint_row(work, col, bg, lim)
    if score <= 0:
        raise LocalizationError(f"no knee joint line in the {where} (no row darker than the bone above and below "
                                "it; not a knee film, or too low contrast)")
    col, width = _bone_extent(work, row, col, (c_lo, c_hi), bg, lim)
    row, score = _joint_row(work, col, bg, lim)
    col, width = _bone_extent(work, row, col, (c_lo, c_hi), bg, lim)
    if not lim.bone_width_mm[0] <= width <= lim.bone_width_mm[1]:
        raise LocalizationError(f"bone at the joint line in the {where} is {width:.0f} mm wide; a knee is "
                                f"{lim.bone_width_mm[0]:.0f}-{lim.bone_width_mm[1]:.0f} mm")
    if score < lim.min_joint_score:
        raise LocalizationError(f"no knee joint line in the {where} (gap contrast {score:.2f} < "
                                f"{lim.min_joint_score}; not a knee film, or too low contrast)")
    return KneeLocation(float(row), col, score, width, min(score, 1.0))


def localize_profile(image: np.ndarray, spacing_mm: tuple[float, float], *, knees: int,
                     limits: ProfileLimits = LIMITS) -> list[KneeLocation]:
    """Joint centres on a film by row/column intensity profiles (see the module docstring).

    Args:
        image: (H, W) float in [0, 1], bright = bone.
        spacing_mm: (row, column) pixel spacing in mm.
        knees: 2 for a bilateral film (one knee per half), 1 for a single-knee film.
        limits: plausibility limits.

    Returns:
        Knee locations in film pixels, ordered image-left to image-right.

    Raises:
        LocalizationError: no plausible knee (the reason is the quarantine reason).
    """
    work, sr, sc = to_work(image, spacing_mm)
    bg = float(np.percentile(work, 5))
    w = work.shape[1]
    halves = {2: [(0, w // 2, "image-left half"), (w // 2, w, "image-right half")], 1: [(0, w, "film")]}
    if knees not in halves:
        raise LocalizationError(f"cannot look for {knees} knees on one film; 1 or 2")
    found = [_find_knee(work, lo, hi, bg, limits, where) for lo, hi, where in halves[knees]]
    if knees == 2:
        (a, b) = found
        dist = float(np.hypot(a.row_px - b.row_px, a.col_px - b.col_px))
        lo, hi = limits.knee_distance_mm
        if not lo <= dist <= hi:
            raise LocalizationError(f"the two joint centres are {dist:.0f} mm apart; plausible is {lo:.0f}-{hi:.0f} mm")
        if abs(a.row_px - b.row_px) > limits.max_height_diff_mm:
            raise LocalizationError(f"the two joint lines differ by {abs(a.row_px - b.row_px):.0f} mm in height "
                                    f"(> {limits.max_height_diff_mm:.0f} mm)")
    # Work pixel centres map back to film pixels at (i + 0.5) * scale - 0.5.
    return [replace(k, row_px=(k.row_px + 0.5) * sr - 0.5, col_px=(k.col_px + 0.5) * sc - 0.5) for k in found]


#: Localisers by name, as lazy "module:function" entries (`LOCALIZERS.get(name)` imports one on first use), so the
#: learned one (which needs torch, and builds on this module's types) costs nothing until it is chosen; plugins add
#: theirs through the entry-point group `kneeoa.localizers`. Each is called as `fn(image, spacing_mm, knees=n)` and
#: returns n KneeLocations (image-left first).
LOCALIZERS: Registry[Callable[..., list[KneeLocation]]] = Registry("localizer", group="kneeoa.localizers",
                                                                   entry_type=Callable)
LOCALIZERS.add("profile", "kneeoa.localize.core:localize_profile")
LOCALIZERS.add("heatmap", "kneeoa.localize.heatmap:localize_heatmap")


# ---------------------------------------------------------------------------------------------------------------
# Crops


def crop_square_mm(image: np.ndarray, spacing_mm: tuple[float, float], center_px: tuple[float, float], *,
                   crop_mm: float, size: int) -> np.ndarray:
    """A `crop_mm` x `crop_mm` square around `center_px`, resized to `size` x `size` (outside the film = 0)."""
    half_r, half_c = crop_mm / 2 / spacing_mm[0], crop_mm / 2 / spacing_mm[1]
    r0, c0 = int(round(center_px[0] - half_r)), int(round(center_px[1] - half_c))
    r1, c1 = int(round(center_px[0] + half_r)), int(round(center_px[1] + half_c))
    out = np.zeros((r1 - r0, c1 - c0), np.float32)
    h, w = image.shape
    sr0, sc0, sr1, sc1 = max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)
    if sr1 > sr0 and sc1 > sc0:
        out[sr0 - r0:sr1 - r0, sc0 - c0:sc1 - c0] = image[sr0:sr1, sc0:sc1]
    return resize(out, size)


def pad_square(image: np.ndarray, size: int) -> np.ndarray:
    """An already-cropped knee: pad the short side symmetrically with its edge values, then resize."""
    h, w = image.shape
    n = max(h, w)
    top, left = (n - h) // 2, (n - w) // 2
    padded = np.pad(image, ((top, n - h - top), (left, n - w - left)), mode="edge")
    return resize(padded.astype(np.float32), size)
