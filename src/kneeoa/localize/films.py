"""From an image file to knee crops: the importers' shared film step, its process pool and its resume record.

A `FilmJob` names one file (a bilateral PA film, a single-knee film or an existing crop) and the crops to write; a
`FilmOutcome` is what came of it (crops written, or the reason each knee was not). `process_film` reads the file
(DICOM or PNG/JPEG), finds the knees with a registered localiser (`kneeoa.localize.core.LOCALIZERS`), cuts
physically sized crops, orients them and writes them, and can draw an overview of the film
(`kneeoa.localize.overview`). `run_film_jobs` runs many on worker processes, recording each finished film when given a
journal folder so that an import killed part-way continues where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from kneeoa.errors import DataError, NotKneeError
from kneeoa.formats.dicom import is_dicom, read_dicom, read_header
from kneeoa.formats.images import load_gray, save_gray16
from kneeoa.formats.pool import process_map
from kneeoa.io import atomic_path
from kneeoa.localize.core import (
    LOCALIZERS,
    KneeLocation,
    KneesMissing,
    LocalizationError,
    crop_square_mm,
    pad_square,
)
from kneeoa.localize.knee_gate import file_reason, image_reason, tag_reason
from kneeoa.localize.overview import draw_overview
from kneeoa.transforms.preprocess import orient

_logger = logging.getLogger(__name__)

#: What a film holds: two knees (bilateral PA), one knee to localise, or a knee already cropped.
FILM_KINDS = ("bilateral", "single", "crop")


@dataclass(frozen=True)
class FilmJob:
    """One image file to turn into knee crops.

    Attributes:
        path: DICOM, PNG or JPEG.
        image_ids: side ("R"/"L") -> image_id of the crop to write; sides not listed are not written.
        kind: one of FILM_KINDS. For "single" and "crop" exactly one side is listed.
        crops_dir: folder the crops go to (``<image_id>.png``).
        crop_mm, image_size, localizer: the crop's side in mm and in pixels and the localiser's name; the callers
            pass them from the data config (`kneeoa.config.DataCfg`, where their defaults live).
        mirror_left: write left-knee crops mirrored into right-knee orientation (importers leave files as acquired
            and mark the manifest's `mirrored` column instead).
        default_spacing_mm: spacing assumed when the file has none; None quarantines such films.
        expect_knee: refuse files that say they are no knee radiograph (`kneeoa.localize.knee_gate`: DICOM tags,
            colour, size, flat pixels).
        dicom: True when the file is known to be DICOM (OAI's suffix-less `001`); None detects it.
        overview: PNG to draw the film to, with each found knee's crop square (`draw_overview`), plus a JSON of the
            same name with what was found and missed; None draws nothing.
        overview_if_missed: draw the overview only when some knee of the film was not cropped.
    """

    path: Path
    image_ids: dict[str, str]
    kind: str
    crops_dir: Path
    crop_mm: float
    image_size: int
    localizer: str
    mirror_left: bool = False
    default_spacing_mm: float | None = None
    expect_knee: bool = True
    dicom: bool | None = None
    overview: Path | None = None
    overview_if_missed: bool = False


@dataclass
class FilmOutcome:
    """Result of a FilmJob: one row per written crop, and the reason when not every listed knee was written.

    `missed` maps each listed side that was not cropped to its reason (a knee the localiser did not find
    confidently); when the whole file failed (unreadable, no spacing, implausible pair) it is empty and only
    `reason` is set.
    """

    job: FilmJob
    crops: list[dict] = field(default_factory=list)
    reason: str | None = None
    missed: dict[str, str] = field(default_factory=dict)


SIDE_WORDS = {"R": "right", "L": "left"}


def locate_knees(image: np.ndarray, spacing_mm: tuple[float, float], *, localizer: str, sides: list[str]
                 ) -> tuple[dict[str, KneeLocation], dict[str, str]]:
    """Run a registered localiser for the knees `sides` (["R", "L"] bilateral, image-left first; one side single).

    Returns:
        (side -> found knee, side -> reason it was not found). A localiser error that concerns the whole film
        (implausible pair, no leg at all) is raised, not split per knee.
    """
    try:
        return dict(zip(sides, LOCALIZERS.get(localizer)(image, spacing_mm, knees=len(sides)), strict=True)), {}
    except KneesMissing as e:
        found = {s: k for s, k in zip(sides, e.knees, strict=True) if k is not None}
        missed = {s: r for s, r in zip(sides, e.reasons, strict=True) if r is not None}
        return found, missed


def load_film(job: FilmJob) -> tuple[np.ndarray, tuple[float, float] | None]:
    """The film of a job as float [0, 1] bright = bone, and its pixel spacing (None when the file has none).

    With `job.expect_knee`, a file whose DICOM tags, colour or size say it is no knee radiograph is refused with
    `NotKneeError` (`kneeoa.localize.knee_gate`); DICOM tags are read before any pixel is decoded.
    """
    dicom = job.dicom or (job.dicom is None and is_dicom(job.path))
    if job.expect_knee:
        reason = tag_reason(read_header(job.path)) if dicom else file_reason(job.path)
        if reason:
            raise NotKneeError(reason)
    if dicom:
        dcm = read_dicom(job.path)
        image, spacing = dcm.image, dcm.pixel_spacing_mm
    else:
        image, spacing = load_gray(job.path), None
    reason = image_reason(image) if job.expect_knee else None
    if reason:
        raise NotKneeError(reason)
    return image, spacing


def process_film(job: FilmJob) -> FilmOutcome:
    """Read, localise, crop, orient and save the knees of one file; failures become the outcome's reason.

    A knee the localiser did not find confidently is not cropped: it goes into `missed` with its reason, the
    outcome's `reason` names it, and the film's other knee is still cropped.
    """
    image = None
    try:
        image, spacing = load_film(job)
        if spacing is None and job.default_spacing_mm is not None:
            spacing = (job.default_spacing_mm, job.default_spacing_mm)
        if job.kind == "crop":
            (side, image_id), = job.image_ids.items()
            crops, missed = {side: (pad_square(image, job.image_size), None)}, {}
            out_mm = spacing[0] * max(image.shape) / job.image_size if spacing else float("nan")
        else:
            if spacing is None:
                raise LocalizationError("no pixel spacing (ImagerPixelSpacing / PixelSpacing) to localise in mm; "
                                        "set data.default_spacing_mm to assume one")
            sides = ["R", "L"] if job.kind == "bilateral" else list(job.image_ids)
            knees, missed = locate_knees(image, spacing, localizer=job.localizer, sides=sides)
            crops = {s: (crop_square_mm(image, spacing, (k.row_px, k.col_px), crop_mm=job.crop_mm,
                                        size=job.image_size), k) for s, k in knees.items()}
            out_mm = job.crop_mm / job.image_size
    except DataError as e:
        if image is not None and job.overview and spacing is not None and job.kind != "crop":
            _write_overview(job, image, spacing, {}, dict.fromkeys(job.image_ids, str(e)))
        return FilmOutcome(job, reason=str(e))
    outcome = FilmOutcome(job, missed={s: r for s, r in missed.items() if s in job.image_ids})
    if job.overview and job.kind != "crop" and (outcome.missed or not job.overview_if_missed):
        _write_overview(job, image, spacing, {s: k for s, (_, k) in crops.items()}, outcome.missed)
    if outcome.missed:
        found = [s for s in job.image_ids if s in crops]
        outcome.reason = "; ".join(f"{SIDE_WORDS[s]} knee not cropped: {r}" for s, r in outcome.missed.items())
        outcome.reason += f" ({', '.join(SIDE_WORDS[s] for s in found)} knee cropped)" if found else ""
    for side, image_id in job.image_ids.items():
        if side not in crops:
            continue
        crop, knee = crops[side]
        path = save_gray16(orient(crop, side, mirror_left=job.mirror_left), Path(job.crops_dir) / f"{image_id}.png")
        outcome.crops.append({
            "image_id": image_id, "side": side, "crop_file": str(path), "pixel_spacing_mm": out_mm,
            "joint_row_px": knee.row_px if knee else np.nan, "joint_col_px": knee.col_px if knee else np.nan,
            "joint_score": knee.score if knee else np.nan, "joint_confidence": knee.confidence if knee else np.nan})
    return outcome


def _write_overview(job: FilmJob, image: np.ndarray, spacing_mm: tuple[float, float], knees: dict[str, KneeLocation],
                    missed: dict[str, str]) -> None:
    """job.overview (PNG: the film with each found knee's crop square) and its JSON (film, knees found, missed)."""
    import json

    from kneeoa.io import write_text

    found = {s: (k.row_px, k.col_px, k.confidence) for s, k in knees.items() if s in job.image_ids}
    job.overview.parent.mkdir(parents=True, exist_ok=True)
    draw_overview(image, spacing_mm, found, missed, crop_mm=job.crop_mm, bilateral=job.kind == "bilateral"
                  ).save(job.overview)
    write_text(json.dumps({"film": str(job.path), "image_ids": job.image_ids,
                           "found": {s: dict(zip(("row_px", "col_px", "confidence"), v, strict=True))
                                     for s, v in found.items()}, "missed": missed}, indent=1),
               job.overview.with_suffix(".json"))


#: Films drawn for the data report by `with_overviews`, evenly spread; films with a missed knee are drawn as well.
OVERVIEW_SAMPLE = 6


def with_overviews(jobs: list[FilmJob], overview_dir: Path, sample: int = OVERVIEW_SAMPLE) -> list[FilmJob]:
    """The jobs, `sample` of them (evenly spread) drawing an overview into `overview_dir`, the others only when a
    knee is missed. Files are named after the film's image ids."""
    chosen = set(np.linspace(0, len(jobs) - 1, min(sample, len(jobs))).round().astype(int)) if jobs else set()
    return [replace(job, overview=Path(overview_dir) / ("__".join(job.image_ids.values()) + ".png"),
                    overview_if_missed=i not in chosen) for i, job in enumerate(jobs)]


def _job_key(job: FilmJob) -> str:
    """A film job's journal name: its every setting plus the file's size and modification time."""
    stat = Path(job.path).stat() if Path(job.path).exists() else None
    text = repr((job, stat and (stat.st_size, stat.st_mtime_ns)))
    return hashlib.sha1(text.encode()).hexdigest()


def _journaled_film(item: tuple[FilmJob, Path]) -> FilmOutcome:
    """process_film, then its outcome recorded at the job's journal entry (after the crops are on disk, atomically)."""
    job, entry = item
    outcome = process_film(job)
    with atomic_path(entry) as tmp:
        tmp.write_bytes(pickle.dumps(outcome))
    return outcome


def run_film_jobs(jobs: Iterable[FilmJob], *, workers: int, desc: str = "films",
                  journal: Path | None = None) -> list[FilmOutcome]:
    """Process films on `workers` processes (file-level work: decoding and localisation), with a progress bar.

    Outcomes come back in job order; `kneeoa.formats.pool.process_map` runs them (spawned workers once torch is
    loaded, so a script calling this needs an `if __name__ == "__main__":` guard). With a `journal` folder each
    finished film's outcome is recorded there, and a rerun after a kill takes the films already done from it
    (same settings, same unchanged file) instead of processing them again; the caller removes the journal once its
    import is complete.
    """
    jobs = list(jobs)
    if journal is None:
        return process_map(process_film, jobs, workers=workers, desc=desc, unit="film", min_per_worker=1)
    journal = Path(journal)
    journal.mkdir(parents=True, exist_ok=True)
    entries = [journal / f"{_job_key(job)}.pkl" for job in jobs]
    done = {}
    for i, entry in enumerate(entries):
        if entry.is_file():
            outcome = pickle.loads(entry.read_bytes())
            if all(Path(c["crop_file"]).is_file() for c in outcome.crops):
                done[i] = outcome
    if done:
        _logger.warning("resuming: %d of %d films already processed (%s)", len(done), len(jobs), journal)
    todo = [i for i in range(len(jobs)) if i not in done]
    fresh = process_map(_journaled_film, [(jobs[i], entries[i]) for i in todo], workers=workers, desc=desc,
                        unit="film", min_per_worker=1)
    done.update(zip(todo, fresh, strict=True))
    return [done[i] for i in range(len(jobs))]
