"""The "heatmap" knee localiser: a tiny fully convolutional network that marks knee joint centres, KNEEL-style.

The classical profile localiser looks for a deep, high-contrast joint gap; real joint spaces are narrow and faint
(issue 10: 9 of 14 real-knee films quarantined). This one learns the whole knee's appearance instead. The film is
resampled once, to REFINE_MM (1 mm) pixels, and then:

1. coarse pass: that copy reduced to WORK_MM (3 mm), 1-99 % stretched, padded to a multiple of 8; `HeatmapNet`
   (~25 k parameters: three stride-2 convolutions, dilated context convolutions that see the whole film, one skip
   connection) gives a knee-centre heat map at 12 mm cells, sigmoid 0-1, run on four half-cell shifts and their
   mirror images in one batch (`dense_heat`: a 6 mm grid). Per half of a bilateral film (right knee on the image
   left), or on the whole of a single-knee film, the hottest point is the knee, the heat-weighted centroid of its
   5 x 5 neighbourhood the joint centre, its heat the confidence;
2. refining pass (when its weights are installed, `installed_refiner`): the same architecture on a WINDOW (96 mm)
   window of the 1 mm copy around each coarse centre, trained on windows drawn around true centres, implants and
   missing legs (`kneeoa localize-train --stage refine`); it moves the centre and gives a second heat.

Quarantine rules (`judge`), each with its reason: coarse heat < MIN_CONFIDENCE (no leg, not a knee film, most
implants); coarse heat < UNSURE_CONFIDENCE with a metal-bright joint area (`metal_share` >= METAL_SHARE: an
implant); when refined, refined heat < MIN_REFINED or a move > MAX_SHIFT_MM. The limits were set on films composed
from kneeKL224 *train* crops. Two confident knees at an implausible distance or height difference quarantine the
film. A quarantined knee is never cropped: `KneesMissing` names it and its reason, and the other knee of the film
is still returned.

Coarse weights ship in the package (`weights/heatmap_knee.safetensors`, float16, < 150 kB) and are loaded offline;
`kneeoa localize-train` (`kneeoa.localize.train`) rebuilds either network reproducibly on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from kneeoa.localize.core import LIMITS, KneeLocation, KneesMissing, LocalizationError, ProfileLimits, to_work

WORK_MM = 3.0  # resolution the network works at
STRIDE = 4  # heat-map cell = STRIDE work pixels
FINE = STRIDE // 2  # heat grid step after interleaving half-cell shifts (work pixels)
GRID_OFFSET = (STRIDE - 1) / 2  # work coordinate of the first cell's centre
#: Coarse heat below which a region holds no knee (train films: knees >= 0.45, implants mostly <= 0.32).
MIN_CONFIDENCE = 0.4
MIN_REFINED = 0.3  # refined heat below which the joint centre is not trusted (provisional: no refiner is shipped)
MAX_SHIFT_MM = 15.0  # refining may move the coarse centre this far (provisional, as MIN_REFINED)
#: Below this coarse heat a knee must also pass the metal check: implants give middling heat (0.1-0.56 on train
#: films), and bright, saturated films give real knees a metal-like share too (up to 0.46), but with high heat.
UNSURE_CONFIDENCE = 0.6
METAL_SHARE = 0.15  # share of the joint area at the film's brightest level that marks metal
#: Where the knees are looked for: (first, last) share of the film's width, and the region's name in reasons.
REGIONS = {2: [(0.0, 0.5, "image-left half"), (0.5, 1.0, "image-right half")], 1: [(0.0, 1.0, "film")]}
WEIGHTS = Path(__file__).parent / "weights" / "heatmap_knee.safetensors"
REFINE_MM = 1.0  # resolution of the second, refining pass
WINDOW = 96  # side of the refining window, REFINE_MM pixels
REFINE_WEIGHTS = Path(__file__).parent / "weights" / "heatmap_refine.safetensors"


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


def dense_heat(net, works: np.ndarray) -> np.ndarray:
    """Heat, 0-1, of `net` on a stack of inputs (N, H, W) (multiples of 8), on a grid of FINE input pixels.

    The network's cells are STRIDE input pixels; running it on the input shifted by half a cell down, right and
    both and interleaving the four maps halves the grid step, which halves the quantisation of a knee centre; the
    mirrored inputs (the network was trained on mirrored films) are averaged in. One batch of 8 N. Grid index f is
    input coordinate FINE * f + GRID_OFFSET.
    """
    import torch

    n, h, w = works.shape
    half = STRIDE // 2
    shifts = [(0, 0), (half, 0), (0, half), (half, half)]
    batch = np.zeros((len(shifts), n, h + 8, w + 8), np.float32)
    for i, (dy, dx) in enumerate(shifts):
        batch[i, :, dy:dy + h, dx:dx + w] = works
    batch = batch.reshape(-1, 1, h + 8, w + 8)
    batch = np.concatenate([batch, batch[..., ::-1]])
    with torch.inference_mode():
        heat = torch.sigmoid(net(torch.from_numpy(batch.copy())))[:, 0].numpy()
    m = len(shifts) * n
    heat = ((heat[:m] + heat[m:, :, ::-1]) / 2).reshape(len(shifts), n, *heat.shape[-2:])
    h4, w4 = h // STRIDE, w // STRIDE
    fine = np.empty((n, 2 * h4, 2 * w4), np.float32)
    for i, (dy, dx) in enumerate(shifts):
        # A shift of half a cell moves cell j to input coordinate STRIDE * j + GRID_OFFSET - half: fine index 2j - 1.
        r0, c0 = int(dy > 0), int(dx > 0)
        fine[:, r0::2, c0::2] = heat[i, :, r0:r0 + h4, c0:c0 + w4]
    return fine


def heat_map(image: np.ndarray, spacing_mm: tuple[float, float], *, weights: Path = WEIGHTS):
    """Knee-centre heat of the whole film, 0-1, on a grid of FINE work pixels; also the scale back to film pixels."""
    work, sr, sc = prepare_input(image, spacing_mm)
    return dense_heat(load_net(weights), work[None])[0], sr, sc


def refine_window(fine_film: np.ndarray, centre: tuple[float, float], background: float) -> tuple[np.ndarray, int, int]:
    """The WINDOW x WINDOW square of a REFINE_MM film around `centre` (its pixels), 1-99 % stretched; its origin.

    Outside the film is `background`. The stretch is the window's own, so the knee's contrast, not the film's
    exposure or a bright collimation border, sets the scale.
    """
    r0, c0 = int(round(centre[0])) - WINDOW // 2, int(round(centre[1])) - WINDOW // 2
    win = np.full((WINDOW, WINDOW), background, np.float32)
    h, w = fine_film.shape
    sr0, sc0, sr1, sc1 = max(r0, 0), max(c0, 0), min(r0 + WINDOW, h), min(c0 + WINDOW, w)
    if sr1 > sr0 and sc1 > sc0:
        win[sr0 - r0:sr1 - r0, sc0 - c0:sc1 - c0] = fine_film[sr0:sr1, sc0:sc1]
    lo, hi = np.percentile(win, [1, 99])
    return np.clip((win - lo) / max(hi - lo, 1e-3), 0, 1), r0, c0


def refine(fine_film: np.ndarray, centres: list[tuple[float, float]], *, weights: Path
           ) -> list[tuple[float, float, float]]:
    """Second pass: each coarse centre (REFINE_MM film pixels) re-found in a window around it at REFINE_MM.

    Returns (row, col, heat) per centre in REFINE_MM film pixels; the heat is the refined knee's confidence (the
    refining network was trained to stay cold on implants, empty legs and windows far off a joint).
    """
    background = float(np.percentile(fine_film, 1))
    windows = [refine_window(fine_film, c, background) for c in centres]
    heat = dense_heat(load_net(weights), np.stack([w for w, _, _ in windows]))
    out = []
    for h, (_, r0, c0) in zip(heat, windows, strict=True):
        row, col, conf = _peak(h, 0, h.shape[1])
        out.append((r0 + FINE * row + GRID_OFFSET, c0 + FINE * col + GRID_OFFSET, conf))
    return out


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


def metal_share(fine_film: np.ndarray, centre: tuple[float, float], top: float, half_mm: int = 30,
                shaft_mm: int = 75) -> float:
    """Share of the +-half_mm square around a joint centre (REFINE_MM film pixels) at >= 97 % of `top`, the film's
    99.9th percentile, beyond the same share in the squares `shaft_mm` above and below it (the femoral and tibial
    shafts).

    Metal (an implant, a plate) is the brightest, flattest thing on a film, and it sits at the joint. A saturated
    film clips the whole leg's bone to its brightest level, the shafts as much as the joint: measured against the
    shafts, its knees no longer look like metal (on wide-exposure val films the joint share alone was up to 1.0 on
    real knees).
    """
    half = round(half_mm / REFINE_MM)

    def share(row: float) -> float | None:
        r, c = int(row), int(centre[1])
        win = fine_film[max(r - half, 0):max(r + half, 0), max(c - half, 0):c + half]
        return float((win >= 0.97 * top).mean()) if win.size else None

    joint = share(centre[0]) or 0.0
    shafts = [v for v in (share(centre[0] - shaft_mm / REFINE_MM), share(centre[0] + shaft_mm / REFINE_MM))
              if v is not None]
    return max(0.0, joint - float(np.mean(shafts))) if shafts else joint


@dataclass(frozen=True)
class KneeCandidate:
    """The best knee of one film region, before the quarantine rules: where it is and what speaks for it.

    Attributes:
        where: the region ("image-left half", "image-right half", "film").
        row_px, col_px: joint centre in film pixels (refined when the refining network is installed).
        coarse, refined: peak heat of the coarse and the refining pass (refined NaN when not refined).
        shift_mm: how far refining moved the centre (NaN when not refined).
        metal: share of the joint area at metal brightness (`metal_share`).
    """

    where: str
    row_px: float
    col_px: float
    coarse: float
    refined: float
    shift_mm: float
    metal: float

    @property
    def confidence(self) -> float:
        """The lower of the two passes' heat (the coarse one alone when not refined)."""
        return float(np.nanmin([self.coarse, self.refined]))


def knee_candidates(image: np.ndarray, spacing_mm: tuple[float, float], *, knees: int, weights: Path = WEIGHTS,
                    refine_weights: Path | None = None) -> list[KneeCandidate]:
    """The hottest knee per region (image-left / image-right half for knees=2, the whole film for 1), refined.

    The film is resampled once, to REFINE_MM (`fine_candidates` works on that copy); positions come back in film
    pixels.

    Raises:
        LocalizationError: an unsupported `knees`, or missing weights.
    """
    fine, fr, fc = to_work(image, spacing_mm, REFINE_MM)
    # Fine pixel i covers film pixels around (i + 0.5) * scale - 0.5.
    return [replace(k, row_px=(k.row_px + 0.5) * fr - 0.5, col_px=(k.col_px + 0.5) * fc - 0.5)
            for k in fine_candidates(fine, knees=knees, weights=weights, refine_weights=refine_weights)]


def fine_candidates(fine: np.ndarray, *, knees: int, weights: Path = WEIGHTS, refine_weights: Path | None = None
                    ) -> list[KneeCandidate]:
    """`knee_candidates` of a film already at REFINE_MM pixels, positions in those pixels.

    The coarse pass reads the film reduced further to WORK_MM; the refining pass reads WINDOW-pixel windows of it.
    """
    if knees not in REGIONS:
        raise LocalizationError(f"cannot look for {knees} knees on one film; 1 or 2")
    heat, sr, sc = heat_map(fine, (REFINE_MM, REFINE_MM), weights=weights)
    work_w = fine.shape[1] * REFINE_MM / WORK_MM / FINE  # unpadded width in grid steps
    coarse = []
    for lo, hi, where in REGIONS[knees]:
        c_lo = int(round(lo * work_w))
        row, col, conf = _peak(heat, c_lo, max(int(round(hi * work_w)), c_lo + 1))
        coarse.append((where, (FINE * row + GRID_OFFSET + 0.5) * sr - 0.5, (FINE * col + GRID_OFFSET + 0.5) * sc - 0.5,
                       conf))
    centres = [(r, c) for _, r, c, _ in coarse]
    refine_weights = refine_weights or installed_refiner()
    refined = (refine(fine, centres, weights=refine_weights) if refine_weights
               else [(r, c, float("nan")) for r, c in centres])
    top = float(np.percentile(fine, 99.9))
    return [KneeCandidate(where, row, col, conf, rconf, float(np.hypot(row - r, col - c)) * REFINE_MM
                          if refine_weights else float("nan"), metal_share(fine, (row, col), top))
            for (where, r, c, conf), (row, col, rconf) in zip(coarse, refined, strict=True)]


def installed_refiner() -> Path | None:
    """The packaged refining network's weights when they are installed, else None (coarse pass only)."""
    return REFINE_WEIGHTS if REFINE_WEIGHTS.exists() else None


def judge(candidate: KneeCandidate, *, min_confidence: float = MIN_CONFIDENCE) -> str | None:
    """Why a candidate must not be cropped (the quarantine reason), or None when it is a knee to crop."""
    k = candidate
    if k.coarse < min_confidence:
        return (f"no knee in the {k.where} (confidence {k.coarse:.2f} < {min_confidence}: no leg, an implant, "
                "or not a knee film)")
    if k.coarse < UNSURE_CONFIDENCE and k.metal >= METAL_SHARE:
        return (f"metal-like bright area over the knee in the {k.where} ({100 * k.metal:.0f} % of the joint area "
                f"at confidence {k.coarse:.2f} < {UNSURE_CONFIDENCE}: an implant?)")
    if k.refined < MIN_REFINED:
        return (f"the knee joint in the {k.where} is not clear at 1 mm (refined confidence {k.refined:.2f} < "
                f"{MIN_REFINED}): an implant, a poor film, or not a knee")
    if k.shift_mm > MAX_SHIFT_MM:
        return (f"the two passes disagree on the knee in the {k.where} by {k.shift_mm:.0f} mm (> {MAX_SHIFT_MM:.0f} "
                "mm): the joint centre is uncertain")
    return None


def localize_heatmap(image: np.ndarray, spacing_mm: tuple[float, float], *, knees: int,
                     min_confidence: float = MIN_CONFIDENCE, limits: ProfileLimits = LIMITS,
                     weights: Path = WEIGHTS, refine_weights: Path | None = None) -> list[KneeLocation]:
    """Joint centres on a film from the two heat-map passes (see the module docstring).

    Args:
        image: (H, W) float in [0, 1], bright = bone.
        spacing_mm: (row, column) pixel spacing in mm.
        knees: 2 for a bilateral film (one knee per half), 1 for a single-knee film.
        min_confidence: coarse heat below which a region holds no knee.
        limits: the knee distance and height-difference limits of a bilateral film.
        weights: the coarse network's weights (default: the packaged ones).
        refine_weights: the refining network's weights (default: the packaged ones when installed, else the
            coarse pass alone decides).

    Returns:
        Knee locations in film pixels, image-left to image-right; `score` is the coarse peak heat, `confidence`
        the lower of the coarse and the refined peak heat.

    Raises:
        KneesMissing: some knee failed a quarantine rule (`judge`; `.knees` holds the others, `.reasons` why).
        LocalizationError: two knees at an implausible distance or height, or an unsupported `knees`.
    """
    candidates = knee_candidates(image, spacing_mm, knees=knees, weights=weights, refine_weights=refine_weights)
    reasons = [judge(k, min_confidence=min_confidence) for k in candidates]
    found = [None if why else KneeLocation(k.row_px, k.col_px, k.coarse, float("nan"), k.confidence)
             for k, why in zip(candidates, reasons, strict=True)]
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
