"""Phantom bilateral PA films in an OAI-shaped release, with the ground truth the OAI importer must rebuild.

Each patient visit of a phantom cohort (`kneeoa.synthetic.phantom.simulate_cohort`) becomes one bilateral PA
fixed-flexion film: both knees rendered by `render_spec` with a wide field of view and composed side by side on a
300 x 400 mm canvas, the patient's right knee on the image left, with burned-in "R" / "L" lead markers. Films vary
the way archives do: pixel spacing (0.14-0.2 mm by default), MONOCHROME1 (inverted values) or MONOCHROME2, 12-16
bits, Digital X-Ray or CR SOP class, uncompressed or RLE / JPEG 2000 / JPEG-LS / JPEG Lossless, exposure (gamma, gain,
offset) and, on some, a VOI window.

The release around them has the OAI layout (`kneeoa.sources.oai`): per-visit folders (`00m/`, `12m/` ...) with a
`contents.csv` and the DICOM at `<Folder>/001`, other series to be ignored (a hand and a chest film), and the
`kXR_SQ_BU{vv}.txt` reading tables with OAI's quirks placed deterministically so a tiny release has each of them:
"code: label" text values, OAI missing codes, duplicate READPRJ rows (project 15 plus a disagreeing 37; or 37 plus a
disagreeing 42 only), readings without a film, and film sides without a reading.

`write_phantom_release` returns (and writes as `truth.csv`) one row per knee: what the importer should produce.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import gaussian_filter

from kneeoa.errors import ConfigError
from kneeoa.formats.dicom import write_dicom
from kneeoa.io import write_text
from kneeoa.sources.oai import READ_VISITS, VARIABLES, VISIT_FOLDERS
from kneeoa.synthetic.phantom import KneeSpec, render_spec, simulate_cohort

#: Film size (height, width) in mm: a 300 x 400 mm cassette fits both knees with 100 mm of shaft either side.
FILM_MM = (300.0, 400.0)
#: Phantom visit index -> OAI visit code (the visits with central X-ray readings).
VISIT_CODES = tuple(READ_VISITS)
MONTHS = {v: m for m, v in VISIT_FOLDERS.items()}
ENCODING_CYCLE = ("explicit", "rle", "j2k", "jpegls", "jpeg_lossless")
MISSING_CODES = (".: Missing Form/Incomplete Workbook", ".M", ".T", ".A: Not Expected", ".J")
GRADE_WORDS = {0: "None", 1: "Definite", 2: "Moderate", 3: "Severe"}
TRUTH_NAME = "truth.csv"


@dataclass(frozen=True)
class FilmPlan:
    """One film to write: its knees, where it goes, and how it is stored."""

    right: KneeSpec
    left: KneeSpec
    participant: str
    visit_code: str
    folder: str  # contents.csv Folder, relative to the visit folder
    path: Path
    spacing_mm: float
    photometric: str
    bits: int
    encoding: str
    sop: str
    windowed: bool
    seed: int


def oai_participant(patient_id: str) -> str:
    """Phantom "P0007" -> a 7-digit OAI-style participant id "9000007"."""
    return f"9{int(patient_id[1:]):06d}"


def _markers(shape: tuple[int, int], px_mm: float) -> np.ndarray:
    """Burned-in lead letters: "R" top-left over the right knee, "L" top-right; 1 where a letter is."""
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(8, round(14 / px_mm)))
    margin = round(12 / px_mm)
    draw.text((margin, margin), "R", fill=255, font=font)
    draw.text((shape[1] - 2 * margin, margin), "L", fill=255, font=font)
    return np.asarray(canvas, np.float32) / 255


def render_film(right: KneeSpec, left: KneeSpec, *, spacing_mm: float, rng: np.random.Generator):
    """Compose one bilateral PA film (right knee on the image left).

    Returns:
        (image float32 (H, W) in [0, 1] bright = bone, {"R": (row, col), "L": (row, col)} joint centres in px,
        pixel spacing in mm).
    """
    height, width = FILM_MM
    n = round(height / spacing_mm)
    px = height / n
    half = round(width / 2 / px)
    separation = rng.uniform(170.0, 230.0)
    row = height / 2 + rng.uniform(-25.0, 25.0)
    tilt = rng.uniform(-8.0, 8.0)
    target = {"R": (row - tilt / 2, width / 2 - separation / 2), "L": (row + tilt / 2, width / 2 + separation / 2)}
    # Each knee is rendered on an n x n square; the right one covers canvas columns [0, n), the left one
    # [2 * half - n, 2 * half); each contributes its own half of the canvas.
    origin_px = {"R": 0, "L": 2 * half - n}
    parts, centres = [], {}
    for spec in (right, left):
        r_mm, c_mm = target[spec.side]
        offset = (r_mm - height / 2, c_mm - origin_px[spec.side] * px - height / 2)
        knee = render_spec(spec, out_px=n, fov_mm=height, center_offset_mm=offset)
        parts.append(knee.image[:, :half] if spec.side == "R" else knee.image[:, n - half:])
        centres[spec.side] = (knee.joint_center_px[0], knee.joint_center_px[1] + origin_px[spec.side])
    film = np.concatenate(parts, axis=1)
    film = np.maximum(film, 0.98 * _markers(film.shape, px))
    return film.astype(np.float32), centres, px


def _exposure(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Film-level exposure variety: detector gamma, gain and offset (the reader's stretch or window undoes them)."""
    out = film ** rng.uniform(0.8, 1.25)
    return np.clip(rng.uniform(0.0, 0.12) + rng.uniform(0.7, 0.88) * out, 0, 1)


def _write_film(plan: FilmPlan) -> dict[str, tuple[float, float]]:
    rng = np.random.default_rng(plan.seed)
    film, centres, px = render_film(plan.right, plan.left, spacing_mm=plan.spacing_mm, rng=rng)
    film = _exposure(film, rng)
    top = 2**plan.bits - 1
    window = (top * float(np.mean(film)), top * 0.95) if plan.windowed else None
    write_dicom(film, plan.path, spacing_mm=px, photometric=plan.photometric, bits=plan.bits, encoding=plan.encoding,
                sop=plan.sop, window=window, laterality="B", patient_id=plan.participant,
                study_description="OAI knee radiograph", series_description="Bilateral PA Fixed Flexion Knee")
    return {"spacing_mm": px, **centres}


def chest_film(spacing_mm: float, rng: np.random.Generator, shape_mm: tuple[float, float] = (400.0, 420.0)):
    """A chest-like PA film (body, two dark lungs with ribs, bright spine and mediastinum): a non-knee series."""
    h, w = round(shape_mm[0] / spacing_mm), round(shape_mm[1] / spacing_mm)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) * spacing_mm
    cy, cx = shape_mm[0] / 2 + rng.uniform(-10, 10), shape_mm[1] / 2 + rng.uniform(-10, 10)
    img = np.full((h, w), 0.05, np.float32)
    img[((y - cy) / 190) ** 2 + ((x - cx) / 180) ** 2 < 1] = 0.55
    for side in (-1, 1):
        lung = ((y - cy + 10) / 130) ** 2 + ((x - cx - side * 85) / 65) ** 2 < 1
        img[lung] = 0.2
        img[lung & (np.sin((y + 0.25 * np.abs(x - cx)) / 22 * 2 * np.pi) > 0.4)] = 0.45
    img[np.abs(x - cx) < 20] = 0.75
    return np.clip(gaussian_filter(img, 1.0 / spacing_mm) + rng.normal(0, 0.01, img.shape), 0, 1)


def hand_film(spacing_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A hand-like PA film (palm and five fingers): a non-knee series."""
    h, w = round(240 / spacing_mm), round(180 / spacing_mm)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) * spacing_mm
    img = np.full((h, w), 0.05, np.float32)
    img[(y > 130) & (np.abs(x - 90) < 45)] = 0.6
    for k, length in enumerate((60, 90, 100, 90, 70)):
        img[(np.abs(x - 40 - 25 * k) < 7) & (y > 130 - length) & (y <= 130)] = 0.7
    return np.clip(gaussian_filter(img, 1.0 / spacing_mm) + rng.normal(0, 0.01, img.shape), 0, 1)


def _fmt(value: int, style: int, column: str) -> str:
    """An OAI cell: plain code, "code: code", or "code: label" (words for OARSI grades)."""
    if style == 0:
        return str(value)
    if style == 1 or column == "klg":
        return f"{value}: {value}"
    return f"{value}: {GRADE_WORDS[value]}"


def _perturb(grades: dict[str, int]) -> dict[str, int]:
    """Another project's reading: every grade moved by one (within range), so picking it is detectable."""
    return {k: (v + 1 if v < (4 if k == "klg" else 3) else v - 1) for k, v in grades.items()}


def _reading_rows(knee: int, spec: KneeSpec, participant: str, rng: np.random.Generator):
    """Reading-table rows for one knee and the labels the importer must end up with (None = missing).

    Quirks by knee index: every 5th (from 1) has a disagreeing READPRJ 37 row beside its 15 row; every 9th (from 4)
    has only 37 and a disagreeing 42; every 4th (from 0) has one variable as an OAI missing code.
    """
    truth: dict[str, int | None] = dict(spec.grades.as_dict())
    missing_col = list(VARIABLES)[int(rng.integers(len(VARIABLES)))] if knee % 4 == 0 else None
    if knee % 9 == 4:
        projects = [(37, truth), (42, _perturb(truth))]
    elif knee % 5 == 1:
        projects = [(15, truth), (37, _perturb(truth))]
    else:
        projects = [(15, truth)]
    rows = []
    for project, grades in projects:
        side = 1 if spec.side == "R" else 2
        side_text = str(side) if rng.random() < 0.5 else f"{side}: {'Right' if side == 1 else 'Left'}"
        row = {"ID": participant, "SIDE": side_text, "READPRJ": str(project), "VERSION": "1.6"}
        style = int(rng.integers(3))
        for col, var in VARIABLES.items():
            row[var] = _fmt(grades[col], style, col)
        if missing_col:
            row[VARIABLES[missing_col]] = MISSING_CODES[knee % len(MISSING_CODES)]
        rows.append(row)
    if missing_col:
        truth[missing_col] = None
    return rows, truth


def _plan(specs: list[KneeSpec], out: Path, seed: int, spacings_mm: tuple[float, ...]):
    """Films to write and reading rows, with the deterministic quirks of the module docstring."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7_000_001,)))
    by_visit: dict[tuple[str, int], dict[str, KneeSpec]] = {}
    for s in specs:
        by_visit.setdefault((s.patient_id, s.visit), {})[s.side] = s
    films, readings, truth = [], {}, []
    knee = 0
    for f, ((patient_id, visit), knees) in enumerate(sorted(by_visit.items())):
        participant, code = oai_participant(patient_id), VISIT_CODES[visit]
        has_film = f % 6 != 5  # every 6th visit: readings without a film
        barcode = f"{int(rng.integers(10**7, 10**8)):08d}"
        date = f"{2004 + visit}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
        folder = f"{visit}.C.2/{participant}/{date}/{barcode}"
        plan = FilmPlan(knees["R"], knees["L"], participant, code, folder,
                        out / MONTHS[READ_VISITS[code]] / folder / "001",
                        spacing_mm=float(rng.choice(spacings_mm)),
                        photometric=("MONOCHROME1", "MONOCHROME2")[int(rng.integers(2))],
                        bits=int(rng.choice((12, 14, 16))), encoding=ENCODING_CYCLE[f % len(ENCODING_CYCLE)],
                        sop=("dx", "cr")[f % 2], windowed=f % 3 == 2,
                        seed=int(rng.integers(2**63)))
        if has_film:
            films.append(plan)
        for side in ("R", "L"):
            spec = knees[side]
            has_reading = knee % 8 != 2  # every 8th knee: a film side without a reading
            rows, labels = _reading_rows(knee, spec, participant, rng) if has_reading else ([], {})
            readings.setdefault(code, []).extend(rows)
            truth.append({"image_id": f"{participant}_{side}_V{code}", "patient_id": participant,
                          "visit": READ_VISITS[code], "side": side, "phantom_image_id": spec.image_id,
                          "has_film": has_film, "has_reading": has_reading, "low_quality": spec.low_quality,
                          "film_path": str(plan.path.relative_to(out)) if has_film else "",
                          **{c: labels.get(c) for c in VARIABLES}})
            knee += 1
    return films, readings, truth


def _contents(films: list[FilmPlan], out: Path, rng: np.random.Generator) -> None:
    """contents.csv per visit folder, plus the non-knee series (hand, chest) it lists."""
    rows: dict[str, list[dict]] = {}
    for f, plan in enumerate(films):
        month = MONTHS[READ_VISITS[plan.visit_code]]
        base = {"ParticipantID": plan.participant, "StudyDate": plan.folder.split("/")[2],
                "StudyDescription": "OAI knee radiograph"}
        rows.setdefault(month, []).append({"Folder": plan.folder, **base, "Barcode": plan.folder.split("/")[3],
                                           "SeriesDescription": "Bilateral PA Fixed Flexion Knee"})
        others = [("PA Right Hand", "HAND", hand_film)] if f % 3 == 0 else []
        others += [("PA Chest", "CHEST", chest_film)] if f % 4 == 1 else []
        for k, (series, part, make) in enumerate(others):
            barcode = f"{int(plan.folder.split('/')[3]) + k + 1:08d}"
            folder = "/".join(plan.folder.split("/")[:3] + [barcode])
            write_dicom(make(1.0, rng), out / month / folder / "001", spacing_mm=1.0, body_part=part,
                        patient_id=plan.participant, series_description=series)
            rows[month].append({"Folder": folder, **base, "Barcode": barcode, "SeriesDescription": series})
    for month, listing in rows.items():
        df = pd.DataFrame(listing, columns=["Folder", "ParticipantID", "StudyDate", "Barcode", "StudyDescription",
                                            "SeriesDescription"])
        write_text(df.to_csv(index=False), out / month / "contents.csv")


def _reading_tables(readings: dict[str, list[dict]], out: Path) -> None:
    for code, rows in readings.items():
        cols = ["ID", "SIDE", "READPRJ", "VERSION", *(f"V{code}{v}" for v in VARIABLES.values())]
        df = pd.DataFrame(rows).rename(columns={v: f"V{code}{v}" for v in VARIABLES.values()})
        write_text(df.reindex(columns=cols).to_csv(sep="|", index=False), out / f"kXR_SQ_BU{code}.txt")


def write_phantom_release(out_dir: Path, *, patients: int, visits: int, seed: int, low_quality_share: float = 0.0,
                          spacings_mm: tuple[float, ...] = (0.14, 0.15, 0.175, 0.2), workers: int = 2) -> pd.DataFrame:
    """Write an OAI-shaped release of phantom bilateral PA films and return its ground truth.

    Args:
        out_dir: release folder (created); holds kXR_SQ_BU{vv}.txt, <month>/contents.csv, the DICOM, truth.csv.
        patients, visits, seed, low_quality_share: the phantom cohort (`simulate_cohort`); visits <= 7 (00-10).
        spacings_mm: pixel spacings the films are drawn from (larger renders faster; tests use ~0.5 mm).
        workers: processes rendering films.

    Returns:
        truth: one row per knee: image_id (OAI style "9000001_R_V00"), patient_id, visit, side, phantom_image_id,
        has_film, has_reading, low_quality, film_path, the expected labels klg, os_fm ... sc_tl (None = missing),
        and for filmed knees joint_row_px, joint_col_px, joint_row_mm, joint_col_mm, pixel_spacing_mm,
        photometric, bits, encoding, sop, windowed.
    """
    if not 1 <= visits <= len(VISIT_CODES):
        raise ConfigError(f"visits must be 1-{len(VISIT_CODES)} (OAI visits {', '.join(VISIT_CODES)} have X-ray "
                          f"readings). Got {visits!r}.")
    out = Path(out_dir)
    specs = simulate_cohort(patients=patients, visits=visits, seed=seed, low_quality_share=low_quality_share)
    films, readings, truth_rows = _plan(specs, out, seed, tuple(spacings_mm))
    # One participant with readings but no images at all (an OAI reading of a knee whose films are not released).
    extra = oai_participant(f"P{patients + 1:04d}")
    extra_rows, extra_truth = _reading_rows(1, specs[0], extra, np.random.default_rng(seed))
    readings.setdefault(VISIT_CODES[0], []).extend(extra_rows)
    truth_rows.append({"image_id": f"{extra}_{specs[0].side}_V{VISIT_CODES[0]}", "patient_id": extra, "visit": 0,
                       "side": specs[0].side, "phantom_image_id": "", "has_film": False, "has_reading": True,
                       "low_quality": False, "film_path": "", **extra_truth})
    if workers > 1 and len(films) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            written = list(pool.map(_write_film, films))
    else:
        written = [_write_film(p) for p in films]
    _contents(films, out, np.random.default_rng(seed))
    _reading_tables(readings, out)
    truth = pd.DataFrame(truth_rows)
    geometry = []
    for plan, info in zip(films, written, strict=True):
        for side in ("R", "L"):
            r, c = info[side]
            geometry.append({"image_id": f"{plan.participant}_{side}_V{plan.visit_code}", "joint_row_px": r,
                             "joint_col_px": c, "joint_row_mm": r * info["spacing_mm"],
                             "joint_col_mm": c * info["spacing_mm"], "pixel_spacing_mm": info["spacing_mm"],
                             "photometric": plan.photometric, "bits": plan.bits, "encoding": plan.encoding,
                             "sop": plan.sop, "windowed": plan.windowed})
    truth = truth.merge(pd.DataFrame(geometry), on="image_id", how="left")
    for col in VARIABLES:
        truth[col] = truth[col].astype("Int64")
    write_text(truth.to_csv(index=False), out / TRUTH_NAME)
    return truth


def read_truth(release: Path) -> pd.DataFrame:
    """The truth.csv of a phantom release, label columns as Int64."""
    truth = pd.read_csv(Path(release) / TRUTH_NAME, dtype={"patient_id": str, "film_path": str})
    for col in VARIABLES:
        truth[col] = truth[col].astype("Int64")
    return truth
