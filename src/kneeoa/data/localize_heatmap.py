"""The "heatmap" knee localiser: a tiny fully convolutional network that marks knee joint centres, KNEEL-style.

The classical profile localiser looks for a deep, high-contrast joint gap; real joint spaces are narrow and faint
(issue 10: 9 of 14 real-knee films quarantined). This one learns the whole knee's appearance instead, on a copy of
the film at WORK_MM (3 mm) pixels:

1. resample (box filter), stretch the 1-99 % grey range to [0, 1], pad to a multiple of 8;
2. `HeatmapNet` (~25 k parameters: three stride-2 convolutions, dilated context convolutions that see the whole
   film, one skip connection) gives a knee-centre heat map at 1/4 of that resolution (12 mm cells), sigmoid 0-1;
3. per half of a bilateral film (right knee on the image left), or on the whole of a single-knee film, the hottest
   cell is the knee; its value is the knee's confidence, and the heat-weighted centroid of its 3 x 3 neighbourhood
   is the joint centre (finer than a cell).

A knee whose confidence is below `min_confidence` (0.3), or below UNSURE_CONFIDENCE (0.6) with a metal-bright joint
area (`metal_share` >= 0.15), is not cropped: `KneesMissing` names it and its reason, and the other knee of the film
is still returned. Both limits were set on films composed from kneeKL224 *train* crops (true knees: confidence
>= 0.44, 1st percentile 0.53; missing legs, chest and hand films <= 0.2; implants 0.1-0.49, all with metal share
>= 0.2). Two confident knees at an implausible distance or height difference quarantine the film.

Weights ship in the package (`weights/heatmap_knee.safetensors`, float16, < 150 kB) and are loaded offline;
`kneeoa localize-train` (`kneeoa.data.localize_train`) rebuilds them reproducibly on CPU.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from kneeoa.data.localize import LIMITS, KneeLocation, KneesMissing, LocalizationError, ProfileLimits, to_work

WORK_MM = 3.0  # resolution the network works at
STRIDE = 4  # heat-map cell = STRIDE work pixels
FINE = STRIDE // 2  # heat grid step after interleaving half-cell shifts (work pixels)
GRID_OFFSET = (STRIDE - 1) / 2  # work coordinate of the first cell's centre
MIN_CONFIDENCE = 0.3
#: Below this confidence a knee must also pass the metal check: implants give middling heat (0.1-0.5 on train films).
UNSURE_CONFIDENCE = 0.6
METAL_SHARE = 0.15  # share of the joint area at the film's brightest level that marks metal
WEIGHTS = Path(__file__).parent / "weights" / "heatmap_knee.safetensors"


def build_net():
    """The heat-map network (untrained): input (N, 1, H, W) with H, W multiples of 8, output logits (N, 1, H/4, W/4)."""
    import torch

    nn = torch.nn

    def block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    class HeatmapNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down = nn.Sequential(block(1, 12, 2), block(12, 16, 2), block(16, 16))
            self.context = nn.Sequential(block(16, 24, 2), block(24, 24, dilation=2), block(24, 24, dilation=4),
                                         block(24, 24, dilation=8))
            self.fuse = nn.Sequential(nn.Conv2d(40, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
            self.head = nn.Conv2d(16, 1, 1)

        def forward(self, x):
            skip = self.down(x)
            ctx = nn.functional.interpolate(self.context(skip), size=skip.shape[-2:], mode="nearest")
            return self.head(self.fuse(torch.cat([skip, ctx], dim=1)))

    return HeatmapNet()


@lru_cache(maxsize=2)
def load_net(path: Path = WEIGHTS):
    """The trained network in eval mode, float32 on CPU (cached per process).

    Raises:
        LocalizationError: the weights file is missing (a broken install; rebuild with `kneeoa localize-train`).
    """
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise LocalizationError(f"heatmap localiser weights {path} are missing; reinstall kneeoa or rebuild them with "
                                "`kneeoa localize-train CROPS_DIR`")
    net = build_net()
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return net.eval()


def prepare_input(image: np.ndarray, spacing_mm: tuple[float, float]) -> tuple[np.ndarray, float, float]:
    """The network's input: the film at WORK_MM, 1-99 % stretched, padded to multiples of 8; and the scale back."""
    work, sr, sc = to_work(image, spacing_mm, WORK_MM)
    lo, hi = np.percentile(work, [1, 99])
    work = np.clip((work - lo) / max(hi - lo, 1e-3), 0, 1)
    h, w = work.shape
    return np.pad(work, ((0, -h % 8), (0, -w % 8))), sr, sc


def heat_map(image: np.ndarray, spacing_mm: tuple[float, float], *, weights: Path = WEIGHTS):
    """Knee-centre heat, 0-1, on a grid of FINE work pixels; also the row/column scale back to film pixels.

    The network's cells are STRIDE work pixels; running it on the film shifted by half a cell down, right and both
    (one batch of four) and interleaving the four maps halves the grid step, which halves the quantisation of the
    joint centre. Grid index f is work coordinate FINE * f + GRID_OFFSET.
    """
    import torch

    work, sr, sc = prepare_input(image, spacing_mm)
    h, w = work.shape
    half = STRIDE // 2
    shifts = [(0, 0), (half, 0), (0, half), (half, half)]
    batch = np.zeros((len(shifts), 1, h + 8, w + 8), np.float32)
    for i, (dy, dx) in enumerate(shifts):
        batch[i, 0, dy:dy + h, dx:dx + w] = work
    # Mirrored copies too (the network was trained on mirrored films): their heat, mirrored back, is averaged in.
    batch = np.concatenate([batch, batch[..., ::-1]])
    with torch.inference_mode():
        heat = torch.sigmoid(load_net(weights)(torch.from_numpy(batch.copy())))[:, 0].numpy()
    heat = (heat[:len(shifts)] + heat[len(shifts):, :, ::-1]) / 2
    h4, w4 = h // STRIDE, w // STRIDE
    fine = np.empty((2 * h4, 2 * w4), np.float32)
    for i, (dy, dx) in enumerate(shifts):
        # A shift of half a cell moves cell j to work coordinate STRIDE * j + GRID_OFFSET - half: fine index 2j - 1.
        r0, c0 = int(dy > 0), int(dx > 0)
        fine[r0::2, c0::2] = heat[i, r0:r0 + h4, c0:c0 + w4]
    return fine, sr, sc


def _peak(heat: np.ndarray, c_lo: int, c_hi: int, radius: int = 2) -> tuple[float, float, float]:
    """(row, col) of the hottest grid point in columns [c_lo, c_hi), refined by the heat-weighted centroid of its
    neighbours within `radius`, and its heat."""
    part = heat[:, c_lo:c_hi]
    r, c = np.unravel_index(int(np.argmax(part)), part.shape)
    c += c_lo
    r0, r1 = max(r - radius, 0), min(r + radius + 1, heat.shape[0])
    k0, k1 = max(c - radius, c_lo), min(c + radius + 1, c_hi)
    win = heat[r0:r1, k0:k1]
    rr, cc = np.mgrid[r0:r1, k0:k1]
    return float((win * rr).sum() / win.sum()), float((win * cc).sum() / win.sum()), float(heat[r, c])


def metal_share(image: np.ndarray, spacing_mm: tuple[float, float], centre_px: tuple[float, float],
                half_mm: int = 30) -> float:
    """Share of the +-half_mm square around a joint centre at >= 97 % of the film's 99.9th percentile (1 mm pixels).

    Metal (an implant, a plate) is the brightest, flattest thing on a film; on train films a knee's joint area has a
    median share of 0.001 and implants 0.2-0.44.
    """
    work, sr, sc = to_work(image, spacing_mm, 1.0)
    r, c = int(centre_px[0] / sr), int(centre_px[1] / sc)
    win = work[max(r - half_mm, 0):r + half_mm, max(c - half_mm, 0):c + half_mm]
    return float((win >= 0.97 * np.percentile(work, 99.9)).mean()) if win.size else 0.0


def localize_heatmap(image: np.ndarray, spacing_mm: tuple[float, float], *, knees: int,
                     min_confidence: float = MIN_CONFIDENCE, limits: ProfileLimits = LIMITS,
                     weights: Path = WEIGHTS) -> list[KneeLocation]:
    """Joint centres on a film from the heat-map network (see the module docstring).

    Args:
        image: (H, W) float in [0, 1], bright = bone.
        spacing_mm: (row, column) pixel spacing in mm.
        knees: 2 for a bilateral film (one knee per half), 1 for a single-knee film.
        min_confidence: heat below which a knee is not trusted.
        limits: the knee distance and height-difference limits of a bilateral film.
        weights: network weights (default: the packaged ones).

    Returns:
        Knee locations in film pixels, image-left to image-right; `confidence` and `score` are the peak heat.

    Raises:
        KneesMissing: some knee is below `min_confidence` (`.knees` holds the others, `.reasons` why).
        LocalizationError: two knees at an implausible distance or height, or an unsupported `knees`.
    """
    regions = {2: [(0.0, 0.5, "image-left half"), (0.5, 1.0, "image-right half")], 1: [(0.0, 1.0, "film")]}
    if knees not in regions:
        raise LocalizationError(f"cannot look for {knees} knees on one film; 1 or 2")
    heat, sr, sc = heat_map(image, spacing_mm, weights=weights)
    work_w = image.shape[1] * spacing_mm[1] / WORK_MM / FINE  # unpadded width in grid steps
    found: list[KneeLocation | None] = []
    reasons: list[str | None] = []
    for lo, hi, where in regions[knees]:
        row, col, conf = _peak(heat, int(round(lo * work_w)), max(int(round(hi * work_w)), int(round(lo * work_w)) + 1))
        if conf < min_confidence:
            found.append(None)
            reasons.append(f"no knee in the {where} (confidence {conf:.2f} < {min_confidence}: no leg, an implant, "
                           "or not a knee film)")
            continue
        # Work pixel i covers film pixels around (i + 0.5) * scale - 0.5.
        r_work, c_work = FINE * row + GRID_OFFSET, FINE * col + GRID_OFFSET
        knee = KneeLocation((r_work + 0.5) * sr - 0.5, (c_work + 0.5) * sc - 0.5, conf, float("nan"), conf)
        metal = metal_share(image, spacing_mm, (knee.row_px, knee.col_px)) if conf < UNSURE_CONFIDENCE else 0.0
        if metal >= METAL_SHARE:
            found.append(None)
            reasons.append(f"metal-like bright area over the knee in the {where} ({100 * metal:.0f} % of the joint "
                           f"area at confidence {conf:.2f} < {UNSURE_CONFIDENCE}: an implant?)")
            continue
        found.append(knee)
        reasons.append(None)
    if any(k is None for k in found):
        raise KneesMissing(found, reasons)
    if knees == 2:
        a, b = found
        d_row = abs(a.row_px - b.row_px) * spacing_mm[0]
        dist = float(np.hypot(d_row, (a.col_px - b.col_px) * spacing_mm[1]))
        lo, hi = limits.knee_distance_mm
        if not lo <= dist <= hi:
            raise LocalizationError(f"the two joint centres are {dist:.0f} mm apart; plausible is {lo:.0f}-{hi:.0f} mm")
        if d_row > limits.max_height_diff_mm:
            raise LocalizationError(f"the two joint lines differ by {d_row:.0f} mm in height "
                                    f"(> {limits.max_height_diff_mm:.0f} mm)")
    return found
