"""The CSV importer: a hospital's own table of knee images (crops or films) and whatever labels it has.

One table row is one knee: an image path, patient id, side and visit, plus any label columns (klg, the raw OARSI
grades os_fm ... sc_tl, or task labels osteophytes / jsn / sclerosis) and optionally `split`, `low_quality`,
`image_id` and `kind`. `data.csv_columns` maps manifest column -> table column where the names differ.

What an image is decides what happens to it (`kind` column, else `data.csv_kind`):

- "crop": an already-cropped knee (PNG, JPEG or DICOM), padded to a square and resized;
- "single": a film with one knee, localised and cropped to `data.crop_mm`;
- "bilateral": a PA film with both knees; rows for its R and L knee may point at the same file;
- "auto" (default): PNG/JPEG are crops; a DICOM listed for both sides is bilateral, for one side single.

Relative paths resolve against the CSV's folder. Rows that cannot be used (missing file, unknown side, a film that
cannot be localised, a duplicate knee) go to quarantine, named by their line in the CSV.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kneeoa.errors import ConfigError, DataError
from kneeoa.formats.dicom import is_dicom
from kneeoa.localize.films import FILM_KINDS, FilmJob, run_film_jobs
from kneeoa.sources.importers import ImportResult, ImportTarget
from kneeoa.sources.manifest import SPLIT_ALIASES, SPLITS
from kneeoa.tasks import RAW_GRADE_COLUMNS, TASKS, binarised_tasks

REQUIRED = ("image_path", "patient_id", "side")
OPTIONAL = ("visit", "image_id", "kind", "split", "low_quality")
SIDE_WORDS = {"r": "R", "right": "R", "1": "R", "l": "L", "left": "L", "2": "L"}
MISSING_WORDS = ("", "na", "n/a", "nan", "null", "none")  # label cells read as "not graded"


def label_columns() -> tuple[str, ...]:
    """The label columns a table may hold, read from the task registry when a table is read (so a task from an
    installed plugin counts): every learned task that is its own label column (KLG), the raw OARSI grades, and the
    binarised features."""
    own = (name for name, task in TASKS.items() if not task.sources and task.learned)
    return (*own, *RAW_GRADE_COLUMNS, *binarised_tasks())


def _read(source: Path, mapping: dict[str, str]) -> pd.DataFrame:
    if not source.is_file():
        raise DataError(f"CSV table {source} does not exist. Pass the path of the table listing the images.")
    try:
        table = pd.read_csv(source, dtype=str, keep_default_na=False)
    except UnicodeDecodeError as e:
        raw = source.read_bytes()
        try:  # pandas reports the position within its read buffer; find it in the file
            raw.decode("utf-8")
            start = e.start
        except UnicodeDecodeError as whole:
            start = whole.start
        line = raw[:start].count(b"\n") + 1
        raise DataError(f"{source} is not UTF-8 text (byte {raw[start]:#04x} on line {line}; a Latin-1 or "
                        "Windows-1252 export?). Save the table as UTF-8 CSV and run prepare again.") from e
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise DataError(f"{source} cannot be parsed as CSV ({e}).") from e
    if len(table.columns) == 1 and any(sep in table.columns[0] for sep in ";\t|"):
        sep = next(s for s in ";\t|" if s in table.columns[0])
        raise DataError(f"{source} has one column, {table.columns[0]!r}: its fields are separated by {sep!r}, not "
                        "commas. Save it as comma-separated CSV (in a spreadsheet: CSV UTF-8, comma delimited).")
    columns = (*REQUIRED, *OPTIONAL, *label_columns())
    unknown = [k for k in mapping if k not in columns]
    if unknown:
        raise ConfigError(f"data.csv_columns maps unknown manifest column(s) {unknown}; valid: {', '.join(columns)}.")
    cols = {name: mapping.get(name, name) for name in columns}
    missing = [f"{name} (column '{col}')" for name, col in cols.items() if name in REQUIRED and col not in table]
    if missing:
        raise DataError(f"{source} lacks {', '.join(missing)}. Rename the columns or map them in data.csv_columns, "
                        f"e.g. csv_columns: {{image_path: file}}. Columns present: {list(table.columns)}.")
    df = pd.DataFrame({name: table[col].str.strip() for name, col in cols.items() if col in table})
    df["line"] = range(2, len(df) + 2)
    for name in (c for c in label_columns() if c in df):
        df[name] = _labels(df, name, source, cols[name])
    return df


def _label_range(name: str) -> tuple[int, int]:
    if name == "klg":
        return 0, 4
    if name in RAW_GRADE_COLUMNS:
        return 0, 3
    return 0, TASKS.get(name).n_classes - 1


def _labels(df: pd.DataFrame, name: str, source: Path, column: str) -> pd.Series:
    """A label column as Int64: blank or a missing word (NA, NaN, null, none) is <NA>; anything else must be a
    whole number in the label's range.

    Raises:
        DataError: naming the CSV line, the column and the value (2.5 is not rounded to a grade, "two" not dropped).
    """
    text = df[name].where(~df[name].str.lower().isin(MISSING_WORDS), "")
    values = pd.to_numeric(text.replace("", None), errors="coerce")
    lo, hi = _label_range(name)
    bad = (text != "") & (values.isna() | (values % 1 != 0) | (values < lo) | (values > hi))
    if bad.any():
        i = bad[bad].index[0]
        raise DataError(f"{source} line {df.at[i, 'line']}: column '{column}' ({name}) is {df.at[i, name]!r}; "
                        f"labels must be whole numbers {lo}-{hi} or blank ({int(bad.sum())} such row(s)). Correct "
                        "the table; fractional grades are not rounded.")
    return values.astype("Int64")


def _conflict(kept: pd.Series, repeat: pd.Series) -> str:
    """", with conflicting labels (klg 2 vs 3)" when a repeated knee's labels differ from the kept row's, else ""."""
    differ = [f"{c} {kept[c]} vs {repeat[c]}" for c in label_columns()
              if c in kept.index and not (pd.isna(kept[c]) and pd.isna(repeat[c])) and
              (pd.isna(kept[c]) or pd.isna(repeat[c]) or kept[c] != repeat[c])]
    return f" with conflicting labels ({', '.join(differ)})" if differ else " (same labels)"


def _resolve_kind(kind: str, path: Path, sides: set[str]) -> str:
    if kind != "auto":
        return kind
    if not is_dicom(path):
        return "crop"
    return "bilateral" if sides == {"R", "L"} else "single"


def import_csv(source: Path, target: ImportTarget, cfg) -> ImportResult:
    """Import the images listed in a CSV table into knee crops and manifest rows.

    Args:
        source: the CSV file; relative image paths resolve against its folder.
        target: where crops (`target.crop_file`) and the resume journal go.
        cfg: study config (cfg.data.csv_columns, csv_kind, crop_mm, image_size, workers, localizer,
            default_spacing_mm).

    Returns:
        ImportResult: manifest rows with source "csv", the table's label columns (as integers, blank = missing),
        `split` / `low_quality` when the table has them, and `original_path`.

    Raises:
        DataError: the table is missing or lacks a required column.
        ConfigError: data.csv_columns names an unknown column, or data.csv_kind is not a film kind.
    """
    source, d = Path(source), cfg.data
    if d.csv_kind not in (*FILM_KINDS, "auto"):
        raise ConfigError(f"data.csv_kind must be one of {['auto', *FILM_KINDS]}. Got {d.csv_kind!r}.")
    df = _read(source, d.csv_columns)
    quarantine, notes = [], []

    def reject(mask: pd.Series, reason) -> None:
        for _, r in df[mask].iterrows():
            quarantine.append({"item": f"{source.name} line {r['line']}", "reason": reason(r)})

    df["side"] = df["side"].str.lower().map(SIDE_WORDS)
    df["visit"] = pd.to_numeric(df.get("visit", pd.Series("0", index=df.index)), errors="coerce")
    df["path"] = [Path(p) if Path(p).is_absolute() else source.parent / p for p in df["image_path"]]
    df["kind"] = df.get("kind", pd.Series("", index=df.index)).str.lower().replace("", d.csv_kind)
    if "split" in df:
        df["split"] = df["split"].str.lower().map(lambda v: SPLIT_ALIASES.get(v, v))
    checks = [
        (df["side"].isna(), lambda r: "side must be R/L (or right/left, 1/2)"),
        (df["visit"].isna() | (df["visit"] % 1 != 0), lambda r: "visit must be a whole number"),
        (df["patient_id"] == "", lambda r: "patient_id is empty"),
        (~df["kind"].isin((*FILM_KINDS, "auto")), lambda r: f"kind {r['kind']!r} is not one of {FILM_KINDS}"),
        (~df["path"].map(Path.is_file), lambda r: f"image file {r['path']} does not exist"),
    ]
    if "split" in df:
        checks.insert(0, (~df["split"].isin(["", *SPLITS]), lambda r: f"split {r['split']!r} is not one of "
                          f"{', '.join(SPLIT_ALIASES)} (or blank)"))
    ok = pd.Series(True, index=df.index)
    for bad, reason in checks:
        reject(ok & bad, reason)
        ok &= ~bad
    df = df[ok].copy()
    df["visit"] = df["visit"].astype(int)
    if "image_id" not in df or (df["image_id"] == "").any():
        df["image_id"] = [f"{p}_{s}_V{v:02d}" for p, s, v in zip(df["patient_id"], df["side"], df["visit"],
                                                                  strict=True)]
    dup = df.duplicated("image_id", keep="first")
    first = df[~dup].set_index("image_id")
    reject(dup, lambda r: f"image_id {r['image_id']} repeats line {first.at[r['image_id'], 'line']}"
           f"{_conflict(first.loc[r['image_id']], r)}")
    df = df[~dup]

    jobs, job_lines = [], []
    for (path, kind), group in df.groupby(["path", "kind"], sort=False):
        resolved = _resolve_kind(kind, path, set(group["side"]))
        if resolved != "bilateral" and len(group) > 1:
            reject(df.index.isin(group.index), lambda r, k=resolved, n=len(group): f"{r['path']} is a {k} image "
                   f"listed for {n} knees; list it once or mark it kind=bilateral")
            continue
        jobs.append(FilmJob(path, dict(zip(group["side"], group["image_id"], strict=True)), resolved,
                            target.crops_dir, crop_mm=d.crop_mm, image_size=d.image_size,
                            localizer=d.localizer,
                            default_spacing_mm=d.default_spacing_mm, expect_knee=resolved != "crop"))
        job_lines.append(group["line"].tolist())
    crops = []
    outcomes = run_film_jobs(jobs, workers=d.workers, desc="CSV images", journal=target.journal)
    for outcome, lines in zip(outcomes, job_lines, strict=True):
        if outcome.reason:
            quarantine.append({"item": f"{source.name} line(s) {', '.join(map(str, lines))}",
                               "reason": f"{outcome.job.path}: {outcome.reason}"})
        crops += outcome.crops
    manifest = _manifest(df, crops, target)
    notes.append(f"{source}: {len(df) + len(quarantine)} row(s) -> {len(manifest)} knee crop(s), "
                 f"{len(quarantine)} quarantined")
    return ImportResult(manifest=manifest, quarantine=pd.DataFrame(quarantine, columns=["item", "reason"]),
                        notes=notes)


def _manifest(df: pd.DataFrame, crops: list[dict], target: ImportTarget) -> pd.DataFrame:
    labels = [c for c in label_columns() if c in df]
    extra = [c for c in ("split",) if c in df]
    base = ["image_id", "patient_id", "visit", "side", "image_path", "source", "low_quality", *labels, *extra,
            "pixel_spacing_mm", "original_path"]
    if not crops:
        return pd.DataFrame(columns=base)
    out = pd.DataFrame(crops)[["image_id", "pixel_spacing_mm"]].merge(df, on="image_id", how="left")
    out["original_path"] = out["path"].astype(str)
    out["image_path"] = [target.manifest_path(target.crop_file(i)) for i in out["image_id"]]
    out["source"] = "csv"
    if "split" in out:
        out["split"] = out["split"].replace("", None)  # blank everywhere: prepare splits by patient
    low = out["low_quality"].str.lower() if "low_quality" in out else pd.Series("", index=out.index)
    out["low_quality"] = low.isin(["1", "true", "yes"])
    return out[base].sort_values("image_id").reset_index(drop=True)
