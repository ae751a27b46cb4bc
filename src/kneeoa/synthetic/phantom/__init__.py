"""The synthetic knee-radiograph phantom: the embedded default dataset, with known grades and feature masks.

A cohort of patients, each with a patient-specific anatomy (`anatomy`), two knees and several visits; each
knee's KL grade and OARSI grades are drawn by `grades` and progress over visits; every image is rendered by
`render.render_knee` (PA view, radiographic orientation) under a routine or deliberately poor acquisition
(`quality`). `import_phantom` is the "phantom" importer: it writes a 16-bit crop (`<image_id>.png`) and boolean masks
at crop resolution (`<image_id>.npz`) per image where its `ImportTarget` says (RUN_DIR/crops/ and masks/ for
`kneeoa prepare`) and returns the manifest rows.

Determinism: patient i draws its anatomy and baseline grades from `SeedSequence(seed, spawn_key=(i,))`, each knee
its progression and quality flags from `spawn_key=(i, side)`, and each image renders from
`SeedSequence(seed, spawn_key=(i, side, visit))`, so the same seed gives the same bytes and adding patients or
visits never changes the ones already there. docs/phantom.md describes the tables and sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kneeoa.errors import ConfigError
from kneeoa.formats.images import save_gray16
from kneeoa.io import atomic_path
from kneeoa.sources.importers import ImportResult, ImportTarget
from kneeoa.synthetic.phantom.anatomy import Anatomy, sample_anatomy
from kneeoa.synthetic.phantom.grades import KneeGrades, progress, sample_grades
from kneeoa.synthetic.phantom.quality import DEGRADATIONS, sample_quality
from kneeoa.synthetic.phantom.render import MIN_OUT_PX, RenderedKnee, render_knee

SIDES = ("R", "L")
#: Probability that a patient's left knee starts at the right knee's KL grade (both knees of a patient tend to
#: agree); otherwise it is drawn from the mix on its own. Either way each knee's KL grade follows `KL_MIX`.
SAME_KL_BOTH_KNEES = 0.4


@dataclass(frozen=True)
class KneeSpec:
    """Everything needed to render one image of the cohort, and its ground truth.

    Attributes:
        patient_id: "P0001", ...;  image_id: "<patient_id>_<side>_V<visit, 2 digits>", e.g. "P0001_R_V00".
        visit: 0-based visit index;  side: "R" or "L".
        grades: the knee's grades at this visit;  anatomy: the patient's anatomy (shared by both knees and visits).
        low_quality: the image is rendered with a deliberate fault;  seed: the image's own render seed.
    """

    patient_id: str
    image_id: str
    visit: int
    side: str
    grades: KneeGrades
    anatomy: Anatomy
    low_quality: bool
    seed: int


def _check_int(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}. Got {value!r}.")
    return int(value)


def _check_share(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"low_quality_share must be a number between 0 and 1 (the share of deliberately poor "
                          f"images). Got {value!r}.")
    return float(value)


def _image_seed(seed: int, patient: int, side: int, visit: int) -> int:
    state = np.random.SeedSequence(seed, spawn_key=(patient, side, visit)).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


def simulate_cohort(*, patients: int, visits: int, seed: int, low_quality_share: float) -> list[KneeSpec]:
    """The ground truth of a phantom cohort: `patients` x 2 knees x `visits` images (no rendering).

    Args:
        patients: number of patients (>= 1), ids P0001, P0002, ...
        visits: visits per patient (>= 1); grades progress from one visit to the next and never decrease.
        seed: cohort seed (>= 0); patient i depends only on (seed, i).
        low_quality_share: expected share of images rendered with a deliberate fault, 0-1.

    Returns:
        KneeSpec per image, ordered by patient, side (R, L), visit.

    Example:
        >>> specs = simulate_cohort(patients=2, visits=2, seed=0, low_quality_share=0.0)
        >>> [s.image_id for s in specs][:3]
        ['P0001_R_V00', 'P0001_R_V01', 'P0001_L_V00']
    """
    patients = _check_int("patients", patients, 1)
    visits = _check_int("visits", visits, 1)
    seed = _check_int("seed", seed, 0)
    share = _check_share(low_quality_share)
    specs = []
    for i in range(patients):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))
        anatomy = sample_anatomy(rng)
        primary = anatomy.primary_compartment
        first = sample_grades(rng, primary=primary)
        same = rng.random() < SAME_KL_BOTH_KNEES
        baseline = {"R": first, "L": sample_grades(rng, first.klg if same else None, primary=primary)}
        patient_id = f"P{i + 1:04d}"
        for s, side in enumerate(SIDES):
            grades = baseline[side]
            knee_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i, s)))  # visits: own stream
            for visit in range(visits):
                if visit:
                    grades = progress(grades, knee_rng, primary=primary)
                # One uniform draw per image whatever the share, so changing the share changes nothing else.
                low_quality = bool(knee_rng.random() < share)
                specs.append(KneeSpec(patient_id, f"{patient_id}_{side}_V{visit:02d}", visit, side, grades, anatomy,
                                      low_quality, _image_seed(seed, i, s, visit)))
    return specs


def render_spec(spec: KneeSpec, *, out_px: int, fov_mm: float = 140.0,
                center_offset_mm: tuple[float, float] = (0.0, 0.0)) -> RenderedKnee:
    """Render one cohort image from its own seed (the acquisition, including any fault, is drawn from that seed)."""
    rng = np.random.default_rng(spec.seed)
    quality = sample_quality(rng, low_quality=spec.low_quality)
    return render_knee(spec.grades, spec.anatomy, spec.side, out_px=out_px, fov_mm=fov_mm, rng=rng,
                       quality=quality, center_offset_mm=center_offset_mm)


def save_masks(masks: dict[str, np.ndarray], path: Path) -> Path:
    """Write boolean masks to a compressed npz, atomically (byte-identical for identical masks)."""
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **{k: np.asarray(v, dtype=bool) for k, v in masks.items()})
    return Path(path)


def _row(spec: KneeSpec, rendered: RenderedKnee, target: ImportTarget) -> dict[str, Any]:
    return {
        "image_id": spec.image_id, "patient_id": spec.patient_id, "visit": spec.visit, "side": spec.side,
        "image_path": target.manifest_path(target.crop_file(spec.image_id)),
        "mask_path": target.manifest_path(target.mask_file(spec.image_id)),
        "low_quality": spec.low_quality, "degradation": rendered.quality["degradation"] or "none",
        "source": "phantom", **spec.grades.as_dict(), "pixel_spacing_mm": rendered.pixel_spacing_mm,
    }


def import_phantom(source: Path | None, target: ImportTarget, cfg: Any, *,
                   show_progress: bool | None = None) -> ImportResult:
    """The "phantom" importer: simulate the cohort, write crops and masks where `target` says, return manifest rows.

    Uses cfg.seed, cfg.data.patients, cfg.data.visits, cfg.data.image_size (crop px), cfg.data.crop_mm (field of
    view) and cfg.data.low_quality_share. Rows carry image_id, patient_id, visit, side, image_path, mask_path,
    low_quality, degradation, source="phantom", klg, the ten OARSI grades and pixel_spacing_mm; no split.

    Args:
        source: unused (the phantom needs no input); a path given here is noted, not read.
        target: where the crops and masks go (their folders are created).
        cfg: a `kneeoa.config.Config`.
        show_progress: tqdm bar; None shows it only on a terminal.

    Raises:
        ConfigError: patients or visits < 1, image_size < MIN_OUT_PX, low_quality_share outside [0, 1].
    """
    data = cfg.data
    size = _check_int("data.image_size", data.image_size, MIN_OUT_PX)
    specs = simulate_cohort(patients=data.patients, visits=data.visits, seed=cfg.seed,
                            low_quality_share=data.low_quality_share)
    rows = []
    disable = None if show_progress is None else not show_progress  # tqdm: None = only on a terminal
    for spec in tqdm(specs, desc="phantom", unit="img", disable=disable):
        rendered = render_spec(spec, out_px=size, fov_mm=float(data.crop_mm))
        save_gray16(rendered.image, target.crop_file(spec.image_id))
        save_masks(rendered.masks, target.mask_file(spec.image_id))
        rows.append(_row(spec, rendered, target))
    notes = [f"phantom: {data.patients} patients x 2 knees x {data.visits} visits, seed {cfg.seed}, "
             f"{sum(s.low_quality for s in specs)} low-quality images ({', '.join(DEGRADATIONS.names())})."]
    if source is not None:
        notes.append(f"phantom: data.path {source} is not used (the phantom needs no input).")
    return ImportResult(manifest=pd.DataFrame(rows), notes=notes)


__all__ = ["Anatomy", "KneeGrades", "KneeSpec", "RenderedKnee", "import_phantom", "progress", "render_knee",
           "render_spec", "sample_anatomy", "sample_grades", "save_masks", "simulate_cohort"]
