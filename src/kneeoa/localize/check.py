"""Checking knee localisation on your own films: crops, an overview per film with the boxes drawn, localize.csv.

`check_films` runs the importers' own film step (`process_film`: read, localise, crop) over a list of files, so
what it shows is what `kneeoa prepare` would crop; the same step draws per film an overview PNG
(`kneeoa.localize.overview.draw_overview`) and its JSON; `check_films` adds one `localize.csv` row per knee found or
missed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kneeoa.config import DataCfg
from kneeoa.errors import ConfigError
from kneeoa.io import output_dir, write_text
from kneeoa.localize.core import LOCALIZERS
from kneeoa.localize.films import FILM_KINDS, FilmJob, FilmOutcome, run_film_jobs

CSV_COLUMNS = ["film", "side", "centre_x", "centre_y", "confidence", "status", "reason"]


def _rows(outcome: FilmOutcome) -> list[dict]:
    found = {c["side"]: c for c in outcome.crops}
    rows = []
    for side in outcome.job.image_ids:
        if side in found:
            c = found[side]
            rows.append({"film": str(outcome.job.path), "side": side, "centre_x": c["joint_col_px"],
                         "centre_y": c["joint_row_px"], "confidence": c["joint_confidence"], "status": "ok",
                         "reason": ""})
        else:
            reason = outcome.missed.get(side) or outcome.reason or "not localised"
            rows.append({"film": str(outcome.job.path), "side": side, "centre_x": np.nan, "centre_y": np.nan,
                         "confidence": np.nan, "status": "quarantined", "reason": reason})
    return rows


def check_films(films: list[Path], out: Path, *, kind: str = "bilateral", side: str | None = None,
                localizer: str, crop_mm: float, image_size: int, spacing_mm: float | None = None,
                workers: int = 1) -> pd.DataFrame:
    """Localise and crop each film; write OUT/crops/<stem>_<side>.png, OUT/overview/<stem>.png, OUT/localize.csv.

    Args:
        films: DICOM, PNG or JPEG files.
        kind: "bilateral" (two knees, right on the image left) or "single" (one knee, `side` names it).
        side: "R" or "L" for single-knee films.
        localizer, crop_mm, image_size: the localiser and the crop's side in mm and pixels (`kneeoa localize` passes
            its flags, whose defaults are the data config's).
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
    out = output_dir(out)
    sides = ["R", "L"] if kind == "bilateral" else [side]
    jobs = [FilmJob(Path(f), {s: f"{Path(f).stem}_{s}" for s in sides}, kind, out / "crops", crop_mm=crop_mm,
                    image_size=image_size, localizer=localizer, default_spacing_mm=spacing_mm, expect_knee=False,
                    overview=out / "overview" / f"{Path(f).stem}.png") for f in films]
    rows = [row for outcome in run_film_jobs(jobs, workers=workers, desc="films") for row in _rows(outcome)]
    table = pd.DataFrame(rows, columns=CSV_COLUMNS)
    write_text(table.to_csv(index=False), out / "localize.csv")
    return table


def crop_frame_offset(d_row: float, d_col: float, rotation_deg: float, spacing_mm: float) -> tuple[float, float]:
    """A film offset (pixels) from a composed knee's centre, in mm in its source crop's frame: (down the leg, towards
    the crop's right edge). `compose_film` turns each leg by rotation_deg about its centre; this turns it back."""
    theta = np.deg2rad(rotation_deg)
    return (float(np.cos(theta) * d_row + np.sin(theta) * d_col) * spacing_mm,
            float(-np.sin(theta) * d_row + np.cos(theta) * d_col) * spacing_mm)


def score_film_set(folder: Path, crops_dir: Path, *, localizer: str = DataCfg.localizer, tolerance_mm: float = 10.0,
                   crop_mm: float = DataCfg.crop_mm, image_size: int = DataCfg.image_size,
                   workers: int = 1) -> pd.DataFrame:
    """Localise every film of a film set with truth.csv (`kneeoa crop-films`) and score each knee position.

    Returns:
        One row per knee position of truth.csv, plus: found (a crop was written), err_mm (distance from the true
        joint centre), down_mm and across_mm (the same offset in the source crop's frame: down the leg and towards
        the crop's right edge; they tell a localiser that missed the knee from one that found a joint lying off
        its crop's centre), swapped (the crop is nearer the other side's true centre), reason, and verdict:
        "ok" (a knee found within tolerance_mm), "wrong" (a crop of a missing or implant knee, or beyond
        tolerance), "quarantined" (a real knee not cropped, with its reason), "refused" (a missing or implant knee
        not cropped: correct).
    """
    from kneeoa.synthetic.crop_films import read_truth

    truth = read_truth(folder)
    jobs = [FilmJob(Path(film), {s: f"{Path(film).stem}_{s}" for s in g["side"]}, g["kind"].iloc[0], crops_dir,
                    crop_mm=crop_mm, image_size=image_size, localizer=localizer, dicom=True)
            for film, g in truth.groupby("film", sort=False)]
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
        err, swapped, down, across = np.nan, False, np.nan, np.nan
        if crop is not None:
            d_row, d_col = crop["joint_row_px"] - t.centre_row_px, crop["joint_col_px"] - t.centre_col_px
            err = float(np.hypot(d_row, d_col)) * t.spacing_mm
            down, across = crop_frame_offset(d_row, d_col, t.rotation_deg, t.spacing_mm)
            other = centres.get((t.film, "L" if t.side == "R" else "R"))
            if other is not None:
                swapped = bool(np.hypot(crop["joint_row_px"] - other[0], crop["joint_col_px"] - other[1])
                               * t.spacing_mm < err)
        if t.content == "knee":
            verdict = "quarantined" if crop is None else "ok" if err <= tolerance_mm else "wrong"
        else:
            verdict = "refused" if crop is None else "wrong"
        rows.append({**t._asdict(), "found": crop is not None, "err_mm": err, "down_mm": down, "across_mm": across,
                     "swapped": swapped,
                     "reason": "" if crop is not None else reason, "verdict": verdict})
    return pd.DataFrame(rows)
