"""Grading new films with a model package: localise -> crop -> every task per knee -> a table, and CAM overlays.

Films go through the importers' own path (`kneeoa.localize.films.process_film`): the package's localiser, crop size
in mm and crop resolution, the crop written as a 16-bit PNG and read back. So a crop graded here is the crop a run
would have trained and predicted on, and `predict` on a run's own crops gives the run's own prediction tables.

`OUT/predictions.csv` has one row per knee (one row with the reason for a file that could not be graded):

| column | meaning |
|---|---|
| file, side | the input file; "R" / "L" (empty for a file with no knee found) |
| T, T_p0 .. T_p<K-1> | per task T: the decoded class and the class probabilities |
| kind | bilateral, single or crop |
| localizer_confidence | the localiser's joint confidence (NaN for crops) |
| knee_score | the knee check's score, 0-1 (`kneeoa.models.knee_check`); below its threshold: not graded |
| qc_flags | ";"-separated QC flags (see `QC_FLAGS`) |
| crop, cam | the knee crop written under OUT/crops/, and its Grad-CAM overlays (OUT/cam/, with `--cam`) |
| error | why the file, or this knee of it, was not graded (empty when it was) |

Before any grade, the knee check runs: a file whose DICOM tags, colour or size say it is no knee radiograph is
refused first (`kneeoa.localize.knee_gate`), then every knee crop is scored by the package's fitted check and a knee
too unlike the grader's training knees gets its reason in `error` and its `knee_score`, never a grade.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kneeoa.deploy.inputs import InputFile, detect_kind, read_facts
from kneeoa.deploy.package import KneeModel
from kneeoa.errors import DataError
from kneeoa.formats.images import load_gray
from kneeoa.io import write_text
from kneeoa.localize.films import FilmJob, process_film

_logger = logging.getLogger(__name__)

#: Localiser confidence below which a knee is flagged (the profile localiser refuses joints below 0.06).
LOW_CONFIDENCE = 0.1
#: Crops whose grey-level standard deviation is below this are nearly flat: over- or under-exposed, or empty.
LOW_CONTRAST_STD = 0.03
#: Crop-row keys holding the localiser's per-knee confidence, most specific first (the profile localiser's gap
#: score is the fallback).
CONFIDENCE_KEYS = ("confidence", "joint_confidence", "joint_score")
QC_FLAGS = {
    "side_assumed": "the file does not say which knee it is; graded as a right knee",
    "low_localizer_confidence": f"joint found with confidence below {LOW_CONFIDENCE}; check the crop",
    "low_contrast": f"crop grey-level spread below {LOW_CONTRAST_STD}; over- or under-exposed or empty",
}


@dataclass
class Knee:
    """One knee of a file: its crop, where it came from, and (after `grade`) per-task probabilities and classes."""

    side: str
    crop: np.ndarray
    crop_file: Path
    confidence: float
    flags: list[str] = field(default_factory=list)
    knee_score: float = float("nan")
    probs: dict[str, np.ndarray] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)
    cams: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Film:
    """One input file and its knees, or the reason it has none."""

    source: InputFile
    kind: str = ""
    knees: list[Knee] = field(default_factory=list)
    error: str | None = None
    missed: dict[str, str] = field(default_factory=dict)  # side -> why that knee of the film was not found
    refused: list[Knee] = field(default_factory=list)  # knees the knee check refused (Knee.knee_score says how)

    def reasons(self) -> dict[str, str]:
        """side -> why that knee of the film was not graded (not found, or refused by the knee check)."""
        return {**self.missed, **{k.side: refusal(k.knee_score) for k in self.refused}}


def localise(item: InputFile, localizer: dict, crops_dir: Path, key: str) -> Film:
    """Find and crop the knees of one file into `crops_dir` (`<key>_<side>.png`); failures go into Film.error."""
    try:
        facts = read_facts(item.path)
    except DataError as e:
        return Film(item, error=str(e))
    kind = item.kind or detect_kind(facts)
    side = next((s for s in (item.side, facts.laterality) if s in ("R", "L")), None)
    sides = ["R", "L"] if kind == "bilateral" else [side or "R"]
    job = FilmJob(path=item.path, image_ids={s: f"{key}_{s}" for s in sides}, kind=kind, crops_dir=crops_dir,
                  crop_mm=localizer["crop_mm"], image_size=localizer["crop_px"], mirror_left=False,
                  localizer=localizer["name"], default_spacing_mm=localizer.get("default_spacing_mm"),
                  dicom=facts.dicom)
    outcome = process_film(job)
    if not outcome.crops:
        return Film(item, kind, error=outcome.reason or "no knee found")
    # A film with one knee found still grades that knee; the other is reported with the localiser's reason.
    film = Film(item, kind, missed=dict(outcome.missed))
    for row in outcome.crops:
        crop = load_gray(Path(row["crop_file"]))
        confidence = float(next((row[k] for k in CONFIDENCE_KEYS if k in row), np.nan))
        flags = [name for name, hit in (("side_assumed", kind != "bilateral" and side is None),
                                        ("low_localizer_confidence", confidence < LOW_CONFIDENCE),
                                        ("low_contrast", float(crop.std()) < LOW_CONTRAST_STD)) if hit]
        film.knees.append(Knee(row["side"], crop, Path(row["crop_file"]), confidence, flags))
    return film


def refusal(score: float) -> str:
    """The reason written for a knee the knee check refused."""
    return (f"not a knee radiograph like those the grader learned from (knee check: knee_score {score:.4f}); not "
            "graded")


def check_knees(model: KneeModel, films: list[Film], *, refuse: bool = True) -> None:
    """Score every knee of `films` with the package's knee check; knees below its threshold move to Film.refused
    (with `refuse`; else they only get their score).

    A package without a fitted check (`model.knee_check` None) leaves every knee as it is, with no score.
    """
    check = getattr(model, "knee_check", None)
    knees = [k for f in films for k in f.knees]
    if check is None or not knees:
        return
    scores = check.scores([k.crop for k in knees], [k.side for k in knees], model.features)
    for knee, score in zip(knees, scores, strict=True):
        knee.knee_score = float(score)
    for film in films if refuse else []:
        film.refused = [k for k in film.knees if k.knee_score < check.threshold]
        film.knees = [k for k in film.knees if k.knee_score >= check.threshold]


def grade(model: KneeModel, films: list[Film]) -> None:
    """Every task for every knee of `films`, in one batch (fills Knee.probs and Knee.classes)."""
    knees = [k for f in films for k in f.knees]
    if not knees:
        return
    probs = model.predict_proba([k.crop for k in knees], [k.side for k in knees])
    broken = [t for t, p in probs.items() if not np.isfinite(p).all()]
    if broken:
        from kneeoa.deploy.package import PackageError

        raise PackageError(f"The model gave non-finite probabilities for {', '.join(broken)}: its weights are "
                           "damaged. Export the package again; no grade was written.")
    for task, p in probs.items():
        classes = model.decode(task, p)
        for i, knee in enumerate(knees):
            knee.probs[task], knee.classes[task] = p[i], int(classes[i])


def grade_films(model: KneeModel, items: list[InputFile], crops_dir: Path, *, first: int = 0,
                knee_check: bool = True) -> list[Film]:
    """Localise, check and grade a batch of files: the one path `predict`, `serve` and the Python API share.

    Crops are written to `crops_dir` as `<number>_<side>.png`, numbered from `first`.
    """
    films = [localise(item, model.info["localizer"], crops_dir, f"{first + i:05d}") for i, item in enumerate(items)]
    check_knees(model, films, refuse=knee_check)
    grade(model, films)
    return films


def explain(model: KneeModel, knee: Knee, tasks: list[str]) -> None:
    """Grad-CAM of each task's decoded class over the knee's crop (Knee.cams; nothing for kinds without CAM)."""
    for task in tasks:
        heat = model.cam(knee.crop, knee.side, task, knee.classes[task])
        if heat is not None:
            knee.cams[task] = heat


def overlay_png(crop: np.ndarray, heat: np.ndarray | None) -> bytes:
    """PNG bytes of a crop, with its Grad-CAM in the jet colour map on top when given."""
    import io

    from PIL import Image

    from kneeoa.explain.cam import overlay

    rgb = overlay(crop, heat) if heat is not None else np.repeat(np.clip(crop, 0, 1)[..., None], 3, axis=2)
    buf = io.BytesIO()
    Image.fromarray((rgb * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def table_columns(info: dict) -> list[str]:
    """predictions.csv columns for a package: file, side, per task T the class and T_p<k>, then the QC columns."""
    cols = ["file", "side"]
    for task, entry in info["tasks"].items():
        cols += [task, *(f"{task}_p{k}" for k in range(len(entry["classes"])))]
    return cols + ["kind", "localizer_confidence", "knee_score", "qc_flags", "crop", "cam", "error"]


def _knee_row(film: Film, knee: Knee, *, error: str, cam: str = "") -> dict:
    return {"file": str(film.source.path), "side": knee.side, "kind": film.kind,
            "localizer_confidence": knee.confidence, "knee_score": knee.knee_score, "qc_flags": ";".join(knee.flags),
            "crop": str(knee.crop_file), "cam": cam, "error": error}


def _rows(film: Film, cam_files: dict[tuple[int, str], list[str]]) -> list[dict]:
    if film.error:
        return [{"file": str(film.source.path), "side": "", "kind": film.kind, "error": film.error}]
    rows = [{"file": str(film.source.path), "side": side, "kind": film.kind, "error": reason}
            for side, reason in film.missed.items()]
    rows += [_knee_row(film, knee, error=refusal(knee.knee_score)) for knee in film.refused]
    for i, knee in enumerate(film.knees):
        row = _knee_row(film, knee, error="", cam=";".join(cam_files.get((i, knee.side), [])))
        for task, p in knee.probs.items():
            row[task] = knee.classes[task]
            row.update({f"{task}_p{k}": float(v) for k, v in enumerate(p)})
        rows.append(row)
    return rows


def predict_files(model: KneeModel, inputs: list[InputFile], out: Path, *, cam: bool = False, batch_size: int = 16,
                  knee_check: bool = True, progress: bool = True) -> pd.DataFrame:
    """Grade every file of `inputs` and write OUT/predictions.csv (and OUT/cam/*.png with `cam`).

    Files are localised, checked and graded `batch_size` at a time; a file that cannot be read or localised, or
    that the knee check refuses, gets a row with its reason in `error` and the others go on. `knee_check=False`
    skips the fitted check's refusals (scores are still written); the tag and pixel rules always apply.

    Returns:
        The predictions table (also written to OUT/predictions.csv).
    """
    from tqdm.auto import tqdm

    from kneeoa.io import atomic_path, output_dir

    out = output_dir(out)
    crops_dir, cam_dir = out / "crops", out / "cam"
    tasks = list(model.info["tasks"])
    rows: list[dict] = []
    with tqdm(total=len(inputs), desc="predict", unit="file", disable=not progress) as bar:
        for start in range(0, len(inputs), batch_size):
            films = grade_films(model, inputs[start:start + batch_size], crops_dir, first=start,
                                knee_check=knee_check)
            for film in films:
                cam_files: dict[tuple[int, str], list[str]] = {}
                for i, knee in enumerate(film.knees if cam else []):
                    explain(model, knee, tasks)
                    for task, heat in knee.cams.items():
                        path = cam_dir / f"{knee.crop_file.stem}_{task}.png"
                        with atomic_path(path) as tmp:
                            tmp.write_bytes(overlay_png(knee.crop, heat))
                        cam_files.setdefault((i, knee.side), []).append(str(path))
                rows.extend(_rows(film, cam_files))
                if film.error:
                    _logger.warning("%s: %s", film.source.path, film.error)
            bar.update(len(films))
    table = pd.DataFrame(rows).reindex(columns=table_columns(model.info))
    for task in tasks:
        table[task] = table[task].astype("Int64")
    write_text(table.to_csv(index=False), out / "predictions.csv")
    return table
