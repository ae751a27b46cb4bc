"""Patient-specific phantom knee anatomy: sizes and shapes in mm, shared by both knees (mirrored) and every visit.

Coordinates used by the renderer (`render`) are those of a RIGHT knee seen in a PA radiograph: x in mm to
the image right is medial (the lateral side, with the fibula, is on the image left), y in mm points down (distal).
The tibial plateau sits at y = 0 and the intercondylar notch at x = 0. Sizes follow adult knees (femoral condylar
width about 80 mm, tibial plateau about 84 mm, normal radiographic joint space 6-7 mm) scaled by a per-patient size
factor; the joint space is kept a little wider and less variable than in life so that narrowing stays visible
after downsampling a 140 mm crop to 128 px.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kneeoa.synthetic.phantom.grades import MEDIAL_SHARE


@dataclass(frozen=True)
class Anatomy:
    """One patient's knee shape (lengths in mm, already scaled by `size`).

    Attributes:
        size: overall size factor (1 = average adult).
        cond_w_lat, cond_w_med: widths of the lateral / medial femoral condyle.
        cond_h_lat, cond_h_med: vertical semi-axes of the condyles (how round their distal ends are).
        notch_w, notch_h: width and height of the intercondylar notch.
        tib_overhang: how far the tibial plateau reaches beyond the femoral condyles on each side.
        spine_h: height of the tibial spines above the plateau.
        plateau_dip: depth of the concave medial plateau.
        gap_med, gap_lat: normal (JSN grade 0) joint space width of each compartment.
        femur_shaft_hw, tibia_shaft_hw: half widths of the shafts.
        femur_tilt_deg: angle of the femoral shaft to the vertical (anatomic valgus).
        fib_dx, fib_dy, fib_r: fibular head centre relative to the lateral tibial margin and its radius.
        patella_dx, patella_dy, patella_w, patella_h: patella centre (from the notch, up from the condyles) and size.
        bone_density: trabecular bone attenuation (unitless, about 1).
        cortex_mm: cortical thickness scale.
        soft_hw: half width of the soft-tissue silhouette at the joint line.
        primary_compartment: "m" or "l", the compartment osteoarthritis favours in this patient (varus / valgus).
    """

    size: float
    cond_w_lat: float
    cond_w_med: float
    cond_h_lat: float
    cond_h_med: float
    notch_w: float
    notch_h: float
    tib_overhang: float
    spine_h: float
    plateau_dip: float
    gap_med: float
    gap_lat: float
    femur_shaft_hw: float
    tibia_shaft_hw: float
    femur_tilt_deg: float
    fib_dx: float
    fib_dy: float
    fib_r: float
    patella_dx: float
    patella_dy: float
    patella_w: float
    patella_h: float
    bone_density: float
    cortex_mm: float
    soft_hw: float
    primary_compartment: str

    @property
    def lateral_edge(self) -> float:
        """x of the lateral femoral condyle's outer margin (negative)."""
        return -(self.notch_w / 2 + self.cond_w_lat)

    @property
    def medial_edge(self) -> float:
        """x of the medial femoral condyle's outer margin."""
        return self.notch_w / 2 + self.cond_w_med

    @property
    def joint_center_y(self) -> float:
        """y of the crop centre: the middle of the normal joint space (independent of disease)."""
        return -(self.gap_med + self.gap_lat) / 4


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's anatomy (sizes from uniform ranges around adult means, scaled by a size factor).

    Example:
        >>> a = sample_anatomy(np.random.default_rng(0))
        >>> 60 < a.medial_edge - a.lateral_edge < 100
        True
    """
    size = float(rng.uniform(0.9, 1.1))

    def mm(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi)) * size

    return Anatomy(
        size=size,
        cond_w_lat=mm(28.0, 32.0),
        cond_w_med=mm(30.0, 34.0),
        cond_h_lat=mm(11.0, 14.0),
        cond_h_med=mm(12.0, 15.0),
        notch_w=mm(16.0, 20.0),
        notch_h=mm(19.0, 23.0),
        tib_overhang=mm(1.5, 3.5),
        spine_h=mm(7.0, 9.5),
        plateau_dip=mm(0.8, 1.8),
        gap_med=float(rng.uniform(6.8, 7.4)),
        gap_lat=float(rng.uniform(7.4, 8.0)),
        femur_shaft_hw=mm(14.0, 17.0),
        tibia_shaft_hw=mm(14.0, 16.5),
        femur_tilt_deg=float(rng.uniform(4.0, 7.0)),
        fib_dx=mm(0.0, 3.0),
        fib_dy=mm(20.0, 25.0),
        fib_r=mm(9.0, 11.0),
        patella_dx=mm(-4.0, 2.0),
        patella_dy=mm(26.0, 34.0),
        patella_w=mm(40.0, 46.0),
        patella_h=mm(42.0, 50.0),
        bone_density=float(rng.uniform(0.9, 1.1)),
        cortex_mm=mm(1.2, 1.8),
        soft_hw=mm(55.0, 66.0),
        primary_compartment="m" if rng.random() < MEDIAL_SHARE else "l",
    )
