"""Checking knee localisation on your own films: crops, an overview per film with the boxes drawn, localize.csv.

`check_films` runs the importers' own film step (`process_film`: read, localise, crop) over a list of files, so
what it shows is what `kneeoa prepare` would crop, and adds per film an overview PNG (the film reduced to
OVERVIEW_PX wide, each found knee's crop square drawn and labelled with side and confidence, missed sides labelled
with "quarantined") and one `localize.csv` row per knee found or missed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from kneeoa.data.localize import FILM_KINDS, LOCALIZERS, FilmJob, FilmOutcome, load_film, run_film_jobs
from kneeoa.errors import ConfigError, DataError
from kneeoa.io import write_text

OVERVIEW_PX = 800
CSV_COLUMNS = ["film", "side", "centre_x", "centre_y", "confidence", "status", "reason"]


def draw_overview(image: np.ndarray, spacing_mm: tuple[float, float], knees: dict[str, tuple[float, float, float]],
                  missed: dict[str, str], *, crop_mm: float, bilateral: bool) -> Image.Image:
    """The film reduced to OVERVIEW_PX wide (RGB), with found knees boxed in green and missed sides named in red.

    Args:
        image: (H, W) float in [0, 1].
        knees: side -> (row_px, col_px, confidence) in film pixels.
        missed: side -> reason.
        crop_mm: side of the box drawn around each knee.
        bilateral: missed sides are labelled in their half (R image-left), else at the top.
    """
    scale = OVERVIEW_PX / image.shape[1]
    small = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).resize(
        (OVERVIEW_PX, max(1, round(image.shape[0] * scale))), Image.BOX).convert("RGB")
    draw = ImageDraw.Draw(small)
    font = ImageFont.load_default(size=18)
    for side, (row, col, conf) in knees.items():
        hr, hc = crop_mm / 2 / spacing_mm[0] * scale, crop_mm / 2 / spacing_mm[1] * scale
        r, c = row * scale, col * scale
        draw.rectangle([c - hc, r - hr, c + hc, r + hr], outline=(0, 220, 0), width=3)
        draw.ellipse([c - 4, r - 4, c + 4, r + 4], fill=(0, 220, 0))
        draw.text((c - hc + 4, r - hr + 4), f"{side} {conf:.2f}", fill=(0, 220, 0), font=font)
    for side in missed:
        x = (OVERVIEW_PX * (0.05 if side == "R" else 0.55)) if bilateral else OVERVIEW_PX * 0.05
        draw.text((x, small.height / 2), f"{side}: quarantined", fill=(230, 0, 0), font=font)
    return small


def _rows(outcome: FilmOutcome) -> list[dict]:
    found = {c["side"]: c for c in outcome.crops}
    rows = []
    for side in outcome.job.image_ids:
        if side in found:
            c = found[side]
            rows.append({"film": str(outcome.job.path), "side": side, "centre_x": c["joint_col_px"],
                         "centre_y": c["joint_row_px"], "confidence": c["joint_score"], "status": "ok", "reason": ""})
        else:
            reason = outcome.missed.get(side) or outcome.reason or "not localised"
            rows.append({"film": str(outcome.job.path), "side": side, "centre_x": np.nan, "centre_y": np.nan,
                         "confidence": np.nan, "status": "quarantined", "reason": reason})
    return rows


def check_films(films: list[Path], out: Path, *, kind: str = "bilateral", side: str | None = None,
                localizer: str = "heatmap", crop_mm: float = 140.0, image_size: int = 224,
                spacing_mm: float | None = None, workers: int = 1) -> pd.DataFrame:
    """Localise and crop each film; write OUT/crops/<stem>_<side>.png, OUT/overview/<stem>.png, OUT/localize.csv.

    Args:
        films: DICOM, PNG or JPEG files.
        kind: "bilateral" (two knees, right on the image left) or "single" (one knee, `side` names it).
        side: "R" or "L" for single-knee films.
        spacing_mm: pixel spacing assumed for files without one (PNG, JPEG, DICOM lacking the tag).

    Returns:
        localize.csv as a table: one row per knee found or missed (CSV_COLUMNS; centre in film pixels).

    Raises:
        ConfigError: an unknown kind or localiser, a single-knee check without a side, or two films with the same
            file stem.
    """
    LOCALIZERS.get(localizer)  # an unknown name fails here, with the valid ones, not once per film
    if kind not in ("bilateral", "single"):
        raise ConfigError(f"kind must be 'bilateral' or 'single' (of {', '.join(FILM_KINDS)}). Got {kind!r}.")
    if kind == "single" and side not in ("R", "L"):
        raise ConfigError(f"a single-knee check needs --side R or L (which knee the films show). Got {side!r}.")
    stems = [Path(f).stem for f in films]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise ConfigError(f"films {', '.join(dupes)} share a file name stem; their crops would overwrite each other. "
                          "Check them in separate runs.")
    out = Path(out)
    sides = ["R", "L"] if kind == "bilateral" else [side]
    jobs = [FilmJob(Path(f), {s: f"{Path(f).stem}_{s}" for s in sides}, kind, out / "crops", crop_mm=crop_mm,
                    image_size=image_size, localizer=localizer, default_spacing_mm=spacing_mm, expect_knee=False)
            for f in films]
    rows = []
    for outcome in run_film_jobs(jobs, workers=workers, desc="films"):
        film_rows = _rows(outcome)
        rows += film_rows
        try:
            image, spacing = load_film(outcome.job)
        except DataError:
            continue  # unreadable: its rows already carry the reason, there is nothing to draw
        spacing = spacing or ((spacing_mm, spacing_mm) if spacing_mm else (1.0, 1.0))
        knees = {r["side"]: (r["centre_y"], r["centre_x"], r["confidence"]) for r in film_rows if r["status"] == "ok"}
        missed = {r["side"]: r["reason"] for r in film_rows if r["status"] != "ok"}
        path = out / "overview" / f"{outcome.job.path.stem}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_overview(image, spacing, knees, missed, crop_mm=crop_mm, bilateral=kind == "bilateral").save(path)
    table = pd.DataFrame(rows, columns=CSV_COLUMNS)
    write_text(table.to_csv(index=False), out / "localize.csv")
    return table



def score_film_set(folder: Path, crops_dir: Path, *, localizer: str = "heatmap", tolerance_mm: float = 10.0,
                   crop_mm: float = 140.0, workers: int = 1) -> pd.DataFrame:
    """Localise every film of a film set with truth.csv (`kneeoa crop-films`) and score each knee position.

    Returns:
        One row per knee position of truth.csv, plus: found (a crop was written), err_mm (distance from the true
        joint centre), swapped (the crop is nearer the other side's true centre), reason, and verdict:
        "ok" (a knee found within tolerance_mm), "wrong" (a crop of a missing or implant knee, or beyond
        tolerance), "quarantined" (a real knee not cropped, with its reason), "refused" (a missing or implant knee
        not cropped: correct).
    """
    from kneeoa.data.crop_films import read_truth

    truth = read_truth(folder)
    jobs = [FilmJob(Path(film), {s: f"{Path(film).stem}_{s}" for s in g["side"]}, g["kind"].iloc[0], crops_dir,
                    crop_mm=crop_mm, localizer=localizer, dicom=True) for film, g in truth.groupby("film", sort=False)]
    found = {}
    for outcome in run_film_jobs(jobs, workers=workers, desc=f"{localizer} on {Path(folder).name}"):
        crops = {c["side"]: c for c in outcome.crops}
        for side in outcome.job.image_ids:
            found[(str(outcome.job.path), side)] = (crops.get(side), outcome.missed.get(side) or outcome.reason)
    centres = {(f, s): (r, c) for f, s, r, c in truth[["film", "side", "centre_row_px", "centre_col_px"]]
               .itertuples(index=False)}
    rows = []
    for t in truth.itertuples(index=False):
        crop, reason = found[(t.film, t.side)]
        err, swapped = np.nan, False
        if crop is not None:
            err = float(np.hypot(crop["joint_row_px"] - t.centre_row_px, crop["joint_col_px"] - t.centre_col_px)
                        ) * t.spacing_mm
            other = centres.get((t.film, "L" if t.side == "R" else "R"))
            if other is not None:
                swapped = bool(np.hypot(crop["joint_row_px"] - other[0], crop["joint_col_px"] - other[1])
                               * t.spacing_mm < err)
        if t.content == "knee":
            verdict = "quarantined" if crop is None else "ok" if err <= tolerance_mm else "wrong"
        else:
            verdict = "refused" if crop is None else "wrong"
        rows.append({**t._asdict(), "found": crop is not None, "err_mm": err, "swapped": swapped,
                     "reason": "" if crop is not None else reason, "verdict": verdict})
    return pd.DataFrame(rows)
