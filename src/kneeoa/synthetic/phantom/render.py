"""Render one phantom knee (PA view) with masks of where each graded feature lies.

Every bone is an implicit shape: a function giving, for each pixel, an approximate signed distance in mm to its
outline (positive inside). Edges are anti-aliased over one pixel, the cortex is a bright rim that decays with that
distance, and the image is the projected attenuation of soft tissue, bones, osteophytes and sclerotic bands passed
through `1 - exp(-A)`, so denser bone is brighter (MONOCHROME2). Everything is vectorised numpy on the output grid.

Geometry (a right knee; `anatomy` explains the frame): the tibia has a flat lateral and a concave medial
plateau with two tibial spines, the fibular head overlaps its lateral margin; the femur ends in two rounded condyles
around the intercondylar notch and is placed so that each condyle stands `JSN_FRACTION[grade] * normal gap` above
the plateau (unequal gaps tilt the femur: the varus/valgus deformity of advanced disease follows from the grades).
Grade-dependent sizes are the tables below, in mm; docs/phantom.md lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from kneeoa.errors import ConfigError
from kneeoa.synthetic.phantom.anatomy import Anatomy
from kneeoa.synthetic.phantom.grades import KneeGrades
from kneeoa.synthetic.phantom.quality import expose, resolve_quality
from kneeoa.tasks import JSN_SITES, OSTEOPHYTE_SITES, SCLEROSIS_SITES

#: Osteophyte length (mm, before the patient's size factor) by OARSI grade 0-3.
OSTEOPHYTE_MM = (0.0, 4.5, 8.0, 12.5)
#: Joint space width as a fraction of the patient's normal width, by JSN grade 0-3 (3 = bone on bone).
JSN_FRACTION = (1.0, 0.6, 0.3, 0.0)
#: Subchondral sclerosis band thickness (mm) and added attenuation, by grade 0-3.
SCLEROSIS_MM = (0.0, 3.5, 6.0, 9.0)
SCLEROSIS_DENSITY = (0.0, 0.45, 0.7, 0.95)
#: The joint-space mask is at least this thick (mm), so a bone-on-bone compartment still has a region to score.
MIN_JOINT_MM = 2.0
#: Smallest output size (px) and field of view range (mm) the renderer accepts.
MIN_OUT_PX = 64
FOV_RANGE_MM = (60.0, 500.0)

MASK_NAMES = ("osteophytes", "jsn", "sclerosis", "joint", *OSTEOPHYTE_SITES, *JSN_SITES, *SCLEROSIS_SITES)


@dataclass(frozen=True)
class RenderedKnee:
    """A rendered knee.

    Attributes:
        image: float32 (out_px, out_px) in [0, 1], higher = denser (bone bright, MONOCHROME2).
        masks: bool (out_px, out_px) arrays named in `MASK_NAMES`: per-site masks (`os_fm`, ..., `jsn_m`, ...,
            `sc_tl`) are empty when that site's grade is 0; `osteophytes`, `jsn`, `sclerosis` are their unions;
            `joint` is the joint space of both compartments, present in every knee.
        joint_center_px: (row, col) of the joint centre (middle of the normal joint space at the notch), float.
        pixel_spacing_mm: the detector pixel size (fov_mm / out_px).
        quality: the complete acquisition dict that was applied (see `quality`).
    """

    image: np.ndarray
    masks: dict[str, np.ndarray]
    joint_center_px: tuple[float, float]
    pixel_spacing_mm: float
    quality: dict[str, Any] = field(default_factory=dict)


def _ramp(d: np.ndarray, px: float) -> np.ndarray:
    """Anti-aliased inside-ness from a signed distance: 0 outside, 1 inside, linear across one pixel."""
    return np.clip(0.5 + d / px, 0.0, 1.0)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _plateau_edges(a: Anatomy) -> tuple[float, float]:
    return a.lateral_edge - a.tib_overhang, a.medial_edge + a.tib_overhang


def _tibia_top(x: np.ndarray, a: Anatomy) -> np.ndarray:
    """y of the tibial articular surface at x: flat lateral plateau, concave medial one, spines, rounded margins."""
    left, right = _plateau_edges(a)
    half_med = (right - a.notch_w / 4) / 2
    u = (x - (right + a.notch_w / 4) / 2) / half_med
    y = a.plateau_dip * np.clip(1.0 - u * u, 0.0, None)
    y = y - a.spine_h * (0.85 * np.exp(-(((x + 4.0) / 2.8) ** 2)) + np.exp(-(((x - 3.5) / 2.8) ** 2)))
    radius = 5.0
    for edge, sign in ((left, -1.0), (right, 1.0)):
        e = np.clip((sign * (x - edge) + radius) / radius, 0.0, 1.0)
        y = y + radius * (1.0 - np.sqrt(1.0 - e * e))
    return y


def _tibia(x: np.ndarray, y: np.ndarray, top: np.ndarray, a: Anatomy) -> np.ndarray:
    left, right = _plateau_edges(a)
    t = _smoothstep((y - 10.0) / 90.0)
    flare = 2.5 * np.exp(-(((y - 9.0) / 8.0) ** 2))
    centre = 3.0
    el = left + (centre - a.tibia_shaft_hw - left) * t - flare
    er = right + (centre + a.tibia_shaft_hw - right) * t + flare
    return np.minimum(np.minimum(y - top, x - el), er - x)


def _fibula(x: np.ndarray, y: np.ndarray, a: Anatomy) -> np.ndarray:
    cx, cy = _plateau_edges(a)[0] + a.fib_dx, a.fib_dy
    head = (1.0 - np.hypot((x - cx) / a.fib_r, (y - cy) / (1.2 * a.fib_r))) * a.fib_r
    shaft_x = cx + 0.05 * (y - cy)
    shaft = np.minimum(0.5 * a.fib_r - np.abs(x - shaft_x), y - cy)
    return np.maximum(head, shaft)


def _condyle_profiles(xf: np.ndarray, a: Anatomy) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """The femur's distal outline y(xf) in its own frame (condyle bottoms at 0) and each condyle's (centre, half)."""
    p = 2.1
    condyles = [(-(a.notch_w + a.cond_w_lat) / 2, a.cond_w_lat / 2, a.cond_h_lat),
                ((a.notch_w + a.cond_w_med) / 2, a.cond_w_med / 2, a.cond_h_med)]
    # The notch roof is an arch from the condyles' inner sides up to notch_h.
    side_h = 0.5 * (a.cond_h_lat + a.cond_h_med)
    arch = np.sqrt(np.clip(1.0 - (xf / (0.5 * a.notch_w + 1.0)) ** 2, 0.0, None))
    low = (-side_h - (a.notch_h - side_h) * arch).astype(xf.dtype)
    for centre, half, height in condyles:
        u = np.abs(xf - centre) / half
        prof = -height * (1.0 - np.clip(1.0 - u**p, 0.0, None) ** (1.0 / p))
        low = np.maximum(low, np.where(u < 1.0, prof, -np.inf))
    return low, [(c, h) for c, h, _ in condyles]


def _femur(xf: np.ndarray, yf: np.ndarray, low: np.ndarray, a: Anatomy) -> np.ndarray:
    h = (a.cond_h_lat + a.cond_h_med) / 2
    t = _smoothstep((-yf - 0.5 * h) / 90.0)
    shaft_x = np.tan(np.radians(a.femur_tilt_deg)) * yf
    epi = 2.5 * np.exp(-(((yf + h + 8.0) / 9.0) ** 2))
    fl = a.lateral_edge + (shaft_x - a.femur_shaft_hw - a.lateral_edge) * t - epi
    fr = a.medial_edge + (shaft_x + a.femur_shaft_hw - a.medial_edge) * t + epi
    return np.minimum(np.minimum(low - yf, xf - fl), fr - xf)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return (1.0 - np.hypot((x - cx) / rx, (y - cy) / ry)) * min(rx, ry)


def _spur(x: np.ndarray, y: np.ndarray, anchor: tuple[float, float], angle_deg: float, length: float) -> np.ndarray:
    """Signed distance to a tapering bony spur that starts 3 mm inside the bone at `anchor` and points at `angle`."""
    dx, dy = float(np.cos(np.radians(angle_deg))), float(np.sin(np.radians(angle_deg)))
    u = (x - anchor[0]) * dx + (y - anchor[1]) * dy
    v = -(x - anchor[0]) * dy + (y - anchor[1]) * dx
    width = (0.5 * length + 2.0) * np.clip(1.0 - u / length, 0.0, 1.0) ** 0.8
    return np.minimum(np.minimum(u + 3.0, length - u), width - np.abs(v))


def _femur_pose(a: Anatomy, grades: KneeGrades) -> tuple[float, float, float, float]:
    """(cos, sin, tx, ty) placing the femur frame in the tibia frame so each condyle stands its graded gap high."""
    _, ((cl, _), (cm, _)) = _condyle_profiles(np.zeros(1), a)
    top = _tibia_top(np.array([cl, cm]), a)
    yl = float(top[0]) - a.gap_lat * JSN_FRACTION[grades.jsn_l]
    ym = float(top[1]) - a.gap_med * JSN_FRACTION[grades.jsn_m]
    s = (ym - yl) / (cm - cl)
    c = float(np.sqrt(1.0 - s * s))
    return c, s, cl - c * cl, yl - s * cl


def _bone_attenuation(d: np.ndarray, px: float, fill: float, cortex: float, cortex_mm: float | np.ndarray,
                      texture: np.ndarray, shaft: np.ndarray | float = 0.0) -> np.ndarray:
    """Projected attenuation of one bone: a rounded body with texture and a cortex that thickens along the shaft
    (`shaft` 0 at the joint to 1 on the diaphysis, where the medullary canal also shows darker)."""
    inside = _ramp(d, px)
    depth = np.clip(d, 0.0, None)
    body = fill * (0.55 + 0.45 * np.sqrt(np.clip(d / 12.0, 0.0, 1.0))) * (1.0 + 0.12 * texture)
    body = body * (1.0 - 0.3 * shaft * np.clip(depth / 6.0, 0.0, 1.0))
    ct = cortex_mm * (1.0 + 2.0 * shaft)
    rim = cortex * (1.0 + 0.6 * shaft) * np.exp(-depth / ct)
    return inside * (body + rim)


def _texture(rng: np.random.Generator, shape: tuple[int, int], px_mm: float) -> np.ndarray:
    """Trabecular pattern: band-passed noise elongated along the bone's long axis, plus slow density variation."""
    fine = ndimage.gaussian_filter(rng.standard_normal(shape, np.float32), (1.1 / px_mm, 0.5 / px_mm), truncate=3.0)
    coarse = ndimage.gaussian_filter(rng.standard_normal(shape, np.float32), 5.0 / px_mm, truncate=3.0)
    return 0.8 * fine / (fine.std() + 1e-9) + 0.4 * coarse / (coarse.std() + 1e-9)


def _check_render_args(out_px: int, fov_mm: float) -> None:
    if not isinstance(out_px, int | np.integer) or out_px < MIN_OUT_PX:
        raise ConfigError(f"out_px must be an integer >= {MIN_OUT_PX} (smaller crops cannot show the features). "
                          f"Got {out_px!r}.")
    if not FOV_RANGE_MM[0] <= fov_mm <= FOV_RANGE_MM[1]:
        raise ConfigError(f"fov_mm must be between {FOV_RANGE_MM[0]:g} and {FOV_RANGE_MM[1]:g} mm "
                          f"(140 for a knee crop, about 250 for a film of one knee). Got {fov_mm!r}.")


def render_knee(grades: KneeGrades, anatomy: Anatomy, side: str, *, out_px: int, fov_mm: float,
                rng: np.random.Generator, quality: dict[str, Any] | None = None,
                center_offset_mm: tuple[float, float] = (0.0, 0.0)) -> RenderedKnee:
    """Render one PA knee radiograph and its feature masks.

    Args:
        grades: what to show (KL grade and OARSI site grades).
        anatomy: the patient's shape (`sample_anatomy`); a left knee is its mirror image.
        side: "R" (fibula on the image left, as a right knee appears in a PA view) or "L" (fibula on the right).
        out_px: output size, pixels per side (>= MIN_OUT_PX).
        fov_mm: field of view, mm per side (140: a knee crop around the joint; 250: the shafts reach the edges).
        rng: draws the trabecular texture, spur jitter, noise and (when `quality` is None) the acquisition.
        quality: acquisition dict (`quality.NEUTRAL_QUALITY` keys; missing keys are neutral), or None
            for a routine acquisition drawn from `rng`.
        center_offset_mm: (down, right) position of the joint centre relative to the image centre, mm.

    Returns:
        RenderedKnee with the image, the masks at output resolution and the joint centre in pixels.

    Raises:
        ConfigError: bad side, out_px, fov_mm or quality.
    """
    if side not in ("R", "L"):
        raise ConfigError(f"side must be 'R' or 'L'. Got {side!r}.")
    _check_render_args(out_px, fov_mm)
    q = resolve_quality(quality, rng)
    px_mm = fov_mm / out_px
    scale = float(q["scale"])
    px = px_mm / scale  # one detector pixel in anatomy mm
    down = float(q["shift_mm"][0]) + float(center_offset_mm[0])
    right = float(q["shift_mm"][1]) + float(center_offset_mm[1])

    # Detector grid -> anatomy frame: undo shift, rotation and magnification; mirror a left knee.
    grid = ((np.arange(out_px) + 0.5 - out_px / 2) * px_mm).astype(np.float32)
    gy, gx = np.meshgrid(grid - down, grid - right, indexing="ij")
    cr, sr = float(np.cos(np.radians(q["rotation_deg"]))), float(np.sin(np.radians(q["rotation_deg"])))
    x = (cr * gx - sr * gy) / scale
    y = (sr * gx + cr * gy) / scale + anatomy.joint_center_y
    if side == "L":
        x = -x

    c, s, tx, ty = _femur_pose(anatomy, grades)
    xf, yf = c * (x - tx) + s * (y - ty), -s * (x - tx) + c * (y - ty)
    low, condyles = _condyle_profiles(xf, anatomy)
    top = _tibia_top(x, anatomy)
    d_fem, d_tib = _femur(xf, yf, low, anatomy), _tibia(x, y, top, anatomy)

    sizes = {site: OSTEOPHYTE_MM[getattr(grades, site)] * anatomy.size * float(rng.uniform(0.9, 1.1))
             for site in OSTEOPHYTE_SITES}
    left, right_edge = _plateau_edges(anatomy)
    spur_at = {  # anchor (bone frame) and direction: femoral spurs point out and down, tibial ones out and up
        "os_fl": ((anatomy.lateral_edge + 2.5, -0.45 * anatomy.cond_h_lat), 155.0),
        "os_fm": ((anatomy.medial_edge - 2.5, -0.45 * anatomy.cond_h_med), 25.0),
        "os_tl": ((left + 2.0, 1.5), 200.0),
        "os_tm": ((right_edge - 2.0, 1.5), -20.0),
    }
    masks: dict[str, np.ndarray] = {}
    for site, (anchor, angle) in spur_at.items():
        if sizes[site] <= 0:
            masks[site] = np.zeros(x.shape, bool)
            continue
        bx, by = (xf, yf) if site[3] == "f" else (x, y)
        d_spur = _spur(bx, by, anchor, angle, sizes[site])
        masks[site] = d_spur > -1.0
        if site[3] == "f":
            d_fem = np.maximum(d_fem, d_spur)
        else:
            d_tib = np.maximum(d_tib, d_spur)

    texture = _texture(rng, x.shape, px_mm)
    dens, ct = anatomy.bone_density, anatomy.cortex_mm
    soft_hw = anatomy.soft_hw + 0.15 * np.clip(-y, 0.0, None) + 0.04 * np.clip(y, 0.0, None)
    soft = 0.42 * np.sqrt(np.clip(1.0 - ((x + 2.0) / soft_hw) ** 2, 0.0, 1.0)) + 0.08 * _ramp(soft_hw - np.abs(x), px)
    att = (soft
           + _bone_attenuation(d_fem, px, 0.95 * dens, 0.75, ct, texture, _smoothstep((-yf - 40.0) / 50.0))
           + _bone_attenuation(d_tib, px, 0.9 * dens, 0.75, ct, texture, _smoothstep((y - 45.0) / 50.0))
           + _bone_attenuation(_fibula(x, y, anatomy), px, 0.7 * dens, 0.6, ct, texture)
           + _bone_attenuation(_ellipse(xf, yf, anatomy.patella_dx, -anatomy.patella_dy, anatomy.patella_w / 2,
                                        anatomy.patella_h / 2), px, 0.28 * dens, 0.12, 2.0, texture))

    # Subchondral sclerosis: a dense band under each articular surface, thickest mid-compartment.
    (cl, hl), (cm, hm) = condyles
    sc_spans = {"sc_fl": (cl, 0.85 * hl), "sc_fm": (cm, 0.85 * hm),
                "sc_tl": ((left + 3.0 - anatomy.notch_w / 2 - 1.0) / 2, (-anatomy.notch_w / 2 - 1.0 - left - 3.0) / 2),
                "sc_tm": ((right_edge - 3.0 + anatomy.notch_w / 2 + 1.0) / 2,
                          (right_edge - 3.0 - anatomy.notch_w / 2 - 1.0) / 2)}
    for site, (mid, half) in sc_spans.items():
        grade = getattr(grades, site)
        if grade == 0:
            masks[site] = np.zeros(x.shape, bool)
            continue
        bx, depth = (xf, low - yf) if site[3] == "f" else (x, y - top)
        u = (bx - mid) / half
        thick = SCLEROSIS_MM[grade] * anatomy.size * np.clip(1.0 - u**6, 0.0, None)
        band = np.sqrt(np.clip(1.0 - depth / np.maximum(thick, 1e-6), 0.0, 1.0)) * _ramp(depth, px) * (thick > 0)
        att = att + SCLEROSIS_DENSITY[grade] * dens * band * (1.0 + 0.1 * texture)
        masks[site] = (depth > -0.5) & (depth < thick) & (thick > 0.5)

    # Joint space: between the femoral and tibial surfaces over each condyle, at least MIN_JOINT_MM thick.
    below_femur, above_tibia = yf - low, top - y
    slack = np.clip((MIN_JOINT_MM - (below_femur + above_tibia)) / 2, 0.0, None)
    in_gap = (below_femur > -slack) & (above_tibia > -slack)
    for comp, (mid, half) in (("l", (cl, hl)), ("m", (cm, hm))):
        masks[f"joint_{comp}"] = in_gap & (np.abs(xf - mid) < half - 2.0)
        masks[f"jsn_{comp}"] = masks[f"joint_{comp}"] if getattr(grades, f"jsn_{comp}") else np.zeros(x.shape, bool)
    masks["joint"] = masks.pop("joint_l") | masks.pop("joint_m")
    for name, sites in (("osteophytes", OSTEOPHYTE_SITES), ("jsn", JSN_SITES), ("sclerosis", SCLEROSIS_SITES)):
        masks[name] = np.logical_or.reduce([masks[site] for site in sites])

    ideal = 0.03 + 0.97 * (1.0 - np.exp(-1.05 * att))
    image = expose(ideal, q, rng, px_mm)
    centre = out_px / 2 - 0.5
    return RenderedKnee(image=image, masks={k: masks[k] for k in MASK_NAMES},
                        joint_center_px=(centre + down / px_mm, centre + right / px_mm),
                        pixel_spacing_mm=px_mm, quality=q)
