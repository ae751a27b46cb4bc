"""Bilateral PA knee films composed from real knee crops, with known joint centres and sides: a localiser test bed.

Phantom films (`kneeoa.synthetic.phantom.films`) have a deep, high-contrast joint gap; real joint spaces are narrower
and fainter. This module builds films from real crops (kneeKL224: 224 px 8-bit PNGs, `<split>/<KL>/<OAI id><L|R>.png`)
so a localiser can be tuned and measured on real knee texture:

- each crop is pasted as a square of `crop_mm` (drawn from `FilmVariety.crop_mm`) centred on a known point: the crop
  centre is the true joint centre. kneeKL224 does not state the crops' physical size; we assume 130-140 mm (the
  issue's figure). The condyles fill ~85 % of a crop, which suggests ~100 mm; localisers are trained on 100-145 mm
  so either is covered, and measured on 130-140 mm.
- the leg is continued beyond the crop: rows above and below repeat the crop's top / bottom profile, narrowing
  towards the shafts, columns beside it repeat its edge columns, all inside a soft-tissue envelope that widens
  towards the thigh, on a dark background with a gradient.
- the patient's right knee goes on the image left (PA display); legs are rotated up to +-10 degrees about their joint
  centre, separated by 160-260 mm and offset in height.
- film variety: spacing 0.14-0.35 mm, collimation borders (bright or black), burned-in "R"/"L" and text, exposure
  (gamma, gain, offset; `WIDE_EXPOSURE` adds underexposed, washed-out and saturated films) and noise,
  MONOCHROME1/2 and compressed transfer syntaxes when written as DICOM.
- unusual films: single-knee films, films with one leg missing, films with one knee replaced by a bright
  implant-like blob (a knee that must be quarantined, never cropped as a gradable knee).

`compose_film` renders one film in memory (also at the localiser's coarse working resolution, for training);
`write_crop_films` writes a folder of DICOM films plus `truth.csv`; `write_crop_release` writes an OAI-shaped release
(KL readings from the crops' grades) for `kneeoa prepare oai`.
"""

from __future__ import annotations

import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import gaussian_filter, map_coordinates

from kneeoa.errors import DataError
from kneeoa.formats.dicom import ENCODINGS, write_dicom
from kneeoa.formats.images import load_gray
from kneeoa.io import write_text

#: What stands where a knee should be: a real crop, nothing (no leg), or a bright implant-like blob.
CONTENTS = ("knee", "missing", "implant")
TRUTH_NAME = "truth.csv"
CROP_NAME = re.compile(r"^(?P<patient>\d+)(?P<side>[LR])\.png$")


@dataclass(frozen=True)
class FilmVariety:
    """Ranges film properties are drawn from (mm, degrees, shares of films, grey levels in [0, 1])."""

    crop_mm: tuple[float, float] = (130.0, 140.0)  # physical side of a source crop
    spacing_mm: tuple[float, float] = (0.14, 0.35)
    film_mm: tuple[tuple[float, float], tuple[float, float]] = ((300.0, 380.0), (380.0, 440.0))  # height, width
    single_film_mm: tuple[tuple[float, float], tuple[float, float]] = ((260.0, 340.0), (180.0, 260.0))
    separation_mm: tuple[float, float] = (160.0, 260.0)  # between the two joint centres
    height_offset_mm: float = 25.0  # +- between the two joint centres
    film_offset_mm: float = 40.0  # +- of the joint line from the film's middle row
    rotation_deg: float = 10.0  # +- per leg, about its joint centre
    single_share: float = 0.1
    missing_share: float = 0.05  # bilateral films with one leg absent
    implant_share: float = 0.05  # bilateral films with one knee replaced by an implant-like blob
    collimation_share: float = 0.5
    marker_share: float = 0.8
    noise: tuple[float, float] = (0.003, 0.025)
    # Exposure: film = offset + gain * film ** gamma (then clipped to [0, 1]: a gain above 1 saturates the bone).
    gain: tuple[float, float] = (0.7, 1.0)
    offset: tuple[float, float] = (0.0, 0.1)
    gamma: tuple[float, float] = (0.7, 1.4)


VARIETY = FilmVariety()
#: Films over a wider exposure range, their knees still visible: underexposed and low-contrast (gain down to 0.35),
#: washed out (offset up to 0.2) and saturated (gain up to 1.35: the brightest bone clipped white), gamma 0.55-1.8.
WIDE_EXPOSURE = FilmVariety(gain=(0.35, 1.35), offset=(0.0, 0.2), gamma=(0.55, 1.8))
#: Named film varieties (`kneeoa crop-films --exposure`).
VARIETIES = {"standard": VARIETY, "wide": WIDE_EXPOSURE}


def scan_crops(root: Path, split: str | None) -> pd.DataFrame:
    """The crops of a kneeKL224-style tree: one row per file (path, split, klg, patient_id, side).

    Raises:
        DataError: no `<split>/<KL>/<id><L|R>.png` file under `root`.
    """
    root = Path(root)
    pattern = f"{split}/*/*.png" if split else "**/*.png"
    rows = []
    for path in sorted(root.glob(pattern)):
        m = CROP_NAME.match(path.name)
        if m and path.parent.name.isdigit():
            rows.append({"path": path, "split": path.parent.parent.name, "klg": int(path.parent.name),
                         "patient_id": m["patient"], "side": m["side"]})
    if not rows:
        raise DataError(f"No knee crops named <split>/<KL>/<id><L|R>.png under {root}"
                        f"{f' in split {split!r}' if split else ''}. Pass the kneeKL224 folder (e.g. "
                        "../shared/data/kneeKL224) and a split it has (train, val).")
    return pd.DataFrame(rows)


def load_crop(path: Path) -> np.ndarray:
    """A knee crop as float [0, 1] with bone bright.

    kneeKL224 holds some crops (84 of 6,604) exported from MONOCHROME1 films without inversion: bone dark, soft
    tissue bright. On a DICOM film that knee would be displayed bone-bright (`read_dicom` honours MONOCHROME1), so
    such crops are inverted back: they are the ones whose central half is darker than their outer columns.
    """
    crop = load_gray(path)
    n = crop.shape[1]
    centre = crop[n // 4:3 * n // 4, n // 4:3 * n // 4].mean()
    edges = np.concatenate([crop[:, :n // 14].ravel(), crop[:, -(n // 14):].ravel()]).mean()
    return 1.0 - crop if centre < edges else crop


# ---------------------------------------------------------------------------------------------------------------
# One leg


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _leg(crop: np.ndarray, content: str, y: np.ndarray, x: np.ndarray, crop_mm: float,
         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Leg intensity and soft-tissue mask at leg-frame points (y down the leg, x across, mm from the joint centre).

    `crop` gives the texture: pasted as is for a knee; for an implant only its rows beyond the joint region survive
    and a saturated femoral component, tibial tray and stem cover the joint.
    """
    n = crop.shape[0]
    half = crop_mm / 2
    top, bottom = crop[:3].mean(axis=0), crop[-3:].mean(axis=0)
    left, right = crop[:, :3].mean(axis=1), crop[:, -3:].mean(axis=1)
    tissue = float(np.median(np.concatenate([crop[:, :6].ravel(), crop[:, -6:].ravel()])))
    to_px = lambda v: np.clip((v + half) / crop_mm * n - 0.5, 0, n - 1)  # noqa: E731
    # Beyond the crop the profile narrows towards the shaft over 60 mm (metaphysis -> diaphysis).
    squeeze = 1 + rng.uniform(0.3, 0.7) * np.clip((np.abs(y) - half) / 60.0, 0, 1)
    xs = to_px(x * squeeze)
    value = np.where(y < 0, np.interp(xs, np.arange(n), top), np.interp(xs, np.arange(n), bottom))
    inside_rows = np.abs(y) <= half
    side_cols = np.where(x < 0, np.interp(to_px(y), np.arange(n), left), np.interp(to_px(y), np.arange(n), right))
    value = np.where(inside_rows, side_cols, value)
    inside = inside_rows & (np.abs(x) <= half)
    value[inside] = map_coordinates(crop, [to_px(y[inside]), to_px(x[inside])], order=1)
    if content == "implant":
        core = inside & (np.abs(y) < 0.45 * half)
        value[core] = tissue + 0.1 * (value[core] - tissue)
        femoral = ((y / (0.35 * half)) ** 2 + (x / (0.6 * half)) ** 2 < 1) & (y < -0.03 * half)
        tray = (np.abs(x) < 0.55 * half) & (y > 0.04 * half) & (y < 0.14 * half)
        stem = (np.abs(x) < 0.08 * half) & (y >= 0.14 * half) & (y < 0.7 * half)
        value[femoral | tray | stem] = rng.uniform(0.93, 1.0)
    # Soft-tissue envelope: wider towards the thigh, narrower towards the calf, soft edge of ~4 mm.
    width = half * rng.uniform(1.02, 1.18) * (1 + 0.3 * np.clip(-y / 250, 0, 1) - 0.15 * np.clip(y / 250, 0, 1))
    mask = _smoothstep((width - np.abs(x)) / 4.0)
    return value, mask


# ---------------------------------------------------------------------------------------------------------------
# One film


def _burn_text(film: np.ndarray, spacing_mm: float, texts: list[tuple[str, float, float]], level: float) -> None:
    """Burn white text (label, row mm, column mm) into the film, in place."""
    canvas = Image.new("L", (film.shape[1], film.shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(8, round(14 / spacing_mm)))
    for label, r, c in texts:
        draw.text((round(c / spacing_mm), round(r / spacing_mm)), label, fill=255, font=font)
    letters = np.asarray(canvas, np.float32) / 255
    np.maximum(film, level * letters, out=film)


def compose_film(knees: dict[str, tuple[np.ndarray, str]], *, spacing_mm: float, rng: np.random.Generator,
                 variety: FilmVariety = VARIETY, single: bool = False
                 ) -> tuple[np.ndarray, dict[str, tuple[float, float]], dict]:
    """Compose one PA film from knee crops.

    Args:
        knees: side ("R"/"L") -> (crop float (n, n) in [0, 1], content in CONTENTS). Bilateral films list both
            sides (R goes on the image left); single-knee films list one.
        spacing_mm: isotropic pixel spacing of the film.
        rng: randomness for every drawn property.
        variety: ranges to draw from.
        single: a single-knee film (narrower, one leg near the middle).

    Returns:
        (film float32 (H, W) in [0, 1] bright = bone, side -> (row, col) joint centre in film pixels,
        the drawn properties: crop_mm, rotation_deg per side, collimated).
    """
    (h_lo, h_hi), (w_lo, w_hi) = variety.single_film_mm if single else variety.film_mm
    height, width = rng.uniform(h_lo, h_hi), rng.uniform(w_lo, w_hi)
    rows, cols = round(height / spacing_mm), round(width / spacing_mm)
    yy = (np.arange(rows, dtype=np.float32) + 0.5) * spacing_mm
    xx = (np.arange(cols, dtype=np.float32) + 0.5) * spacing_mm
    angle = rng.uniform(0, 2 * np.pi)
    film = (rng.uniform(0.0, 0.12) + rng.uniform(0, 0.12) * ((xx[None] - width / 2) * np.cos(angle)
            + (yy[:, None] - height / 2) * np.sin(angle)) / width).astype(np.float32)
    row_mm = height / 2 + rng.uniform(-variety.film_offset_mm, variety.film_offset_mm)
    if single:
        centres_mm = {side: (row_mm, width / 2 + rng.uniform(-20, 20)) for side in knees}
    else:
        sep, dh = rng.uniform(*variety.separation_mm), rng.uniform(-1, 1) * variety.height_offset_mm
        centres_mm = {"R": (row_mm - dh / 2, width / 2 - sep / 2), "L": (row_mm + dh / 2, width / 2 + sep / 2)}
    crop_mm = rng.uniform(*variety.crop_mm)
    props: dict = {"crop_mm": crop_mm}
    for side, (crop, content) in knees.items():
        props[f"rotation_deg_{side}"] = 0.0
        if content == "missing":
            continue
        cy, cx = centres_mm[side]
        c0, c1 = np.searchsorted(xx, [cx - 1.5 * crop_mm, cx + 1.5 * crop_mm])
        theta = np.deg2rad(rng.uniform(-variety.rotation_deg, variety.rotation_deg))
        props[f"rotation_deg_{side}"] = float(np.rad2deg(theta))
        dy, dx = yy[:, None] - cy, xx[None, c0:c1] - cx
        y, x = np.cos(theta) * dy + np.sin(theta) * dx, -np.sin(theta) * dy + np.cos(theta) * dx
        # Anti-alias the crop before sampling it at a coarser film spacing.
        src_px = crop_mm / crop.shape[0]
        texture = gaussian_filter(crop, 0.5 * spacing_mm / src_px) if spacing_mm > src_px else crop
        value, mask = _leg(texture, content, y, x, crop_mm, rng)
        region = film[:, c0:c1]
        film[:, c0:c1] = np.maximum(region, mask * value + (1 - mask) * region)
    film = gaussian_filter(film, max(0.3, 0.4 / spacing_mm) if spacing_mm < 0.5 else 0.3)
    props["collimated"] = bool(rng.random() < variety.collimation_share)
    if props["collimated"]:
        level = rng.uniform(0.85, 1.0) if rng.random() < 0.7 else 0.0
        for edge, limit_mm in zip(("top", "bottom", "left", "right"), (0.3 * height, 0.3 * height, 40, 40),
                                  strict=True):
            n = round(min(rng.uniform(0, 30), limit_mm) / spacing_mm) if rng.random() < 0.6 else 0
            if n:
                {"top": film[:n], "bottom": film[-n:], "left": film[:, :n], "right": film[:, -n:]}[edge][...] = level
    if rng.random() < variety.marker_share:
        texts = [("R", 12, 12), ("L", 12, width - 24)] if not single else [(next(iter(knees)), 12, 12)]
        if rng.random() < 0.5:
            texts.append((str(rng.choice(["PA FLEX", "STANDING", "WB", "BILAT"])), height - 25, rng.uniform(10, 60)))
        _burn_text(film, spacing_mm, texts, rng.uniform(0.8, 1.0))
    gain, offset, gamma = rng.uniform(*variety.gain), rng.uniform(*variety.offset), rng.uniform(*variety.gamma)
    film = offset + gain * np.clip(film, 0, 1) ** gamma + rng.normal(0, rng.uniform(*variety.noise), film.shape)
    centres = {s: (r / spacing_mm - 0.5, c / spacing_mm - 0.5) for s, (r, c) in centres_mm.items()}
    return np.clip(film, 0, 1).astype(np.float32), centres, props


# ---------------------------------------------------------------------------------------------------------------
# Film sets on disk


@dataclass(frozen=True)
class FilmPlan:
    """One film to write: which crop (or nothing, or an implant) stands on which side, and how it is stored."""

    name: str
    patient_id: str
    knees: dict[str, tuple[str, str]]  # side -> (crop path or "", content)
    single: bool
    spacing_mm: float
    photometric: str
    encoding: str
    bits: int
    path: Path
    seed: int


def plan_films(crops: pd.DataFrame, out: Path, *, films: int | None, seed: int, variety: FilmVariety = VARIETY,
               bilateral_only: bool = False, film_path=None) -> list[FilmPlan]:
    """One film per patient (both knees, or one on single-knee films), unusual films drawn at the variety's shares.

    `film_path(patient_id, index) -> Path` places each film (default `out/films/<patient>.dcm`); with
    `bilateral_only` no single-knee films are drawn (an OAI release holds bilateral films only).
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(10_000_010,)))
    patients = sorted(crops["patient_id"].unique())
    if films is not None:
        patients = [patients[i] for i in sorted(rng.choice(len(patients), min(films, len(patients)), replace=False))]
    by_patient = {p: dict(zip(g["side"], g["path"], strict=True)) for p, g in crops.groupby("patient_id")}
    plans = []
    for i, patient in enumerate(patients):
        have = by_patient[patient]
        draw = rng.random()
        single = (not bilateral_only) and (draw < variety.single_share or len(have) == 1)
        if single:
            side = str(rng.choice(sorted(have)))
            knees = {side: (str(have[side]), "knee")}
        else:
            knees = {s: (str(have[s]), "knee") if s in have else ("", "missing") for s in ("R", "L")}
            odd = draw - variety.single_share
            if 0 <= odd < variety.missing_share + variety.implant_share and len(have) == 2:
                side = str(rng.choice(["R", "L"]))
                content = "missing" if odd < variety.missing_share else "implant"
                knees[side] = (knees[side][0] if content == "implant" else "", content)
        encoding = list(ENCODINGS)[i % len(ENCODINGS)]
        path = film_path(patient, i) if film_path else out / "films" / f"{patient}.dcm"
        plans.append(FilmPlan(patient, patient, knees, single, round(float(rng.uniform(*variety.spacing_mm)), 3),
                              ("MONOCHROME1", "MONOCHROME2")[int(rng.integers(2))], encoding,
                              int(rng.choice((12, 14, 16))), path, int(rng.integers(2**63))))
    return plans


def _write_film(args: tuple[FilmPlan, FilmVariety]) -> list[dict]:
    plan, variety = args
    rng = np.random.default_rng(plan.seed)
    donor = next(p for p, _ in plan.knees.values() if p)
    knees = {s: (load_crop(Path(p or donor)), content) for s, (p, content) in plan.knees.items()}
    film, centres, props = compose_film(knees, spacing_mm=plan.spacing_mm, rng=rng, variety=variety,
                                        single=plan.single)
    write_dicom(film, plan.path, spacing_mm=plan.spacing_mm, photometric=plan.photometric, bits=plan.bits,
                encoding=plan.encoding, laterality=next(iter(plan.knees)) if plan.single else "B",
                patient_id=plan.patient_id, study_description="Knee radiograph composed from real crops",
                series_description="Bilateral PA Fixed Flexion Knee")
    return [{"film": str(plan.path), "patient_id": plan.patient_id, "kind": "single" if plan.single else "bilateral",
             "side": side, "content": content, "crop_path": path, "centre_row_px": centres[side][0],
             "centre_col_px": centres[side][1], "spacing_mm": plan.spacing_mm, "crop_mm": props["crop_mm"],
             "rotation_deg": props[f"rotation_deg_{side}"], "collimated": props["collimated"],
             "photometric": plan.photometric, "encoding": plan.encoding, "rows": film.shape[0],
             "cols": film.shape[1]} for side, (path, content) in plan.knees.items()]


def _write_all(plans: list[FilmPlan], variety: FilmVariety, workers: int) -> pd.DataFrame:
    jobs = [(p, variety) for p in plans]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rows = [r for film in pool.map(_write_film, jobs) for r in film]
    else:
        rows = [r for job in jobs for r in _write_film(job)]
    return pd.DataFrame(rows)


def write_crop_films(crops_dir: Path, out_dir: Path, *, split: str | None, films: int | None = None, seed: int = 0,
                     variety: FilmVariety = VARIETY, workers: int = 1) -> pd.DataFrame:
    """Write DICOM films composed from the crops of `split` under `crops_dir` to `out_dir/films/`, and truth.csv.

    Returns:
        truth: one row per knee position: film (path), patient_id, kind (bilateral/single), side, content
        (knee/missing/implant), crop_path, centre_row_px, centre_col_px (the crop centre in film pixels),
        spacing_mm, crop_mm, rotation_deg, collimated, photometric, encoding, rows, cols.
    """
    out = Path(out_dir)
    plans = plan_films(scan_crops(crops_dir, split), out, films=films, seed=seed, variety=variety)
    truth = _write_all(plans, variety, workers)
    write_text(truth.to_csv(index=False), out / TRUTH_NAME)
    return truth


def write_crop_release(crops_dir: Path, out_dir: Path, *, split: str | None, films: int | None = None, seed: int = 0,
                       variety: FilmVariety = VARIETY, workers: int = 1) -> pd.DataFrame:
    """An OAI-shaped release (baseline visit 00) of bilateral films from real crops, for `kneeoa prepare oai`.

    `00m/contents.csv` lists every film at `00m/<Folder>/001`; `kXR_SQ_BU00.txt` holds one READPRJ 15 reading per
    knee position with the crop's KL grade (OARSI grades missing, as kneeKL224 has none; a missing or implant knee
    keeps the reading of the crop it replaced, so it must come out quarantined). truth.csv as `write_crop_films`,
    plus image_id (`<patient>_<side>_V00`) and klg.
    """
    from kneeoa.sources.oai import VARIABLES

    out = Path(out_dir)
    crops = scan_crops(crops_dir, split)
    folder = lambda patient, i: f"0.C.2/{patient}/20050101/{10_000_000 + i:08d}"  # noqa: E731
    plans = plan_films(crops, out, films=films, seed=seed, variety=variety, bilateral_only=True,
                       film_path=lambda patient, i: out / "00m" / folder(patient, i) / "001")
    truth = _write_all(plans, variety, workers)
    klg = {(p, s): k for p, s, k in crops[["patient_id", "side", "klg"]].itertuples(index=False)}
    truth["image_id"] = truth["patient_id"] + "_" + truth["side"] + "_V00"
    truth["klg"] = [klg.get((p, s)) for p, s in zip(truth["patient_id"], truth["side"], strict=True)]
    contents = pd.DataFrame([{"Folder": folder(p.patient_id, i), "ParticipantID": p.patient_id,
                              "StudyDate": "20050101", "Barcode": f"{10_000_000 + i:08d}",
                              "StudyDescription": "OAI knee radiograph",
                              "SeriesDescription": "Bilateral PA Fixed Flexion Knee"} for i, p in enumerate(plans)])
    write_text(contents.to_csv(index=False), out / "00m" / "contents.csv")
    readings = truth.dropna(subset=["klg"])
    table = pd.DataFrame({"ID": readings["patient_id"], "SIDE": readings["side"].map({"R": "1", "L": "2"}),
                          "READPRJ": "15", "VERSION": "1.6"})
    for col, var in VARIABLES.items():
        table[f"V00{var}"] = readings["klg"].astype(int).astype(str) if col == "klg" else "."
    write_text(table.to_csv(sep="|", index=False), out / "kXR_SQ_BU00.txt")
    write_text(truth.to_csv(index=False), out / TRUTH_NAME)
    return truth


def read_truth(folder: Path) -> pd.DataFrame:
    """truth.csv of a film set written by `write_crop_films` or `write_crop_release`."""
    path = Path(folder) / TRUTH_NAME
    if not path.exists():
        raise DataError(f"{path} does not exist; write the film set with `kneeoa crop-films` first.")
    return pd.read_csv(path, dtype={"patient_id": str, "crop_path": str}, keep_default_na=False,
                       na_values={"klg": [""]})
