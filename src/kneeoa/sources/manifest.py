"""The manifest: one validated row per knee image, the contract between every importer and every stage.

Columns (required unless marked optional):

| column          | dtype   | meaning                                                                          |
|-----------------|---------|----------------------------------------------------------------------------------|
| image_id        | str     | unique, stable id, e.g. ``9001695_R_V00``; names the crop file                   |
| patient_id      | str     | the unit of independence: splits and bootstraps group by it                      |
| visit           | int     | visit number (OAI: 0, 1, 3, 5, 6, 8, 10; phantom: 0, 1, ...)                     |
| side            | str     | ``R`` or ``L``                                                                   |
| image_path      | str     | crop path, relative to the run folder (or absolute)                             |
| split           | str     | ``train``, ``val`` or ``test``                                                   |
| low_quality     | bool    | known low-quality image (phantom flag, or QC)                                    |
| source          | str     | importer name (``phantom``, ``folders``, ``oai``, ``csv``)                       |
| klg             | Int64   | optional: Kellgren-Lawrence grade 0-4, <NA> when unread                          |
| os_fm ... sc_tl | Int64   | optional: raw OARSI grades 0-3 (see `kneeoa.tasks.RAW_GRADE_COLUMNS`)            |
| osteophytes,... | Int64   | optional: task labels derived from the raw grades by `kneeoa.tasks`              |
| mask_path       | str     | optional: npz of feature masks (phantom), relative to the run folder             |
| pixel_spacing_mm| float   | optional: crop pixel spacing                                                      |
| mirrored        | bool    | optional: read the image flipped left-right (left knee -> right-knee orientation) |

Any other column is kept as it is. `validate_manifest` is called on every write and every read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kneeoa.errors import LeakageError, ManifestError
from kneeoa.io import read_table, write_parquet
from kneeoa.tasks import RAW_GRADE_COLUMNS, TASKS

MANIFEST_NAME = "manifest.parquet"
REQUIRED = ("image_id", "patient_id", "visit", "side", "image_path", "split", "low_quality", "source")
SPLITS = ("train", "val", "test")
#: Split names importers accept from a source (folder names, a `split` column), and the split each means.
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test",
                 "auto_test": "test"}
SIDES = ("R", "L")


def _where(df: pd.DataFrame, idx, origin: str) -> str:
    return f"{origin} row {idx} (image_id {df.at[idx, 'image_id']!r})" if "image_id" in df else f"{origin} row {idx}"


def _show(value) -> str:
    return repr(value.item()) if hasattr(value, "item") else repr(value)


def _check_range(df: pd.DataFrame, col: str, lo: int, hi: int, origin: str, what: str) -> None:
    values = pd.to_numeric(df[col], errors="coerce")
    bad = df[col].notna() & (values.isna() | (values < lo) | (values > hi) | (values % 1 != 0))
    if bad.any():
        i = bad[bad].index[0]
        raise ManifestError(f"{_where(df, i, origin)}: column '{col}' is {_show(df.at[i, col])}; {what} are whole "
                            f"numbers {lo}-{hi}. Correct the source table or drop the row.")


def check_no_leakage(df: pd.DataFrame, origin: str = "manifest") -> None:
    """Raise LeakageError if any patient has images in more than one split."""
    n_splits = df.groupby("patient_id")["split"].nunique()
    leaked = n_splits[n_splits > 1]
    if len(leaked):
        pid = leaked.index[0]
        splits = sorted(df.loc[df["patient_id"] == pid, "split"].unique())
        raise LeakageError(f"{origin}: patient {pid!r} appears in splits {splits} ({len(leaked)} patient(s) in all). "
                           "Splits must be made by patient: fix or drop the source's split column (or split "
                           "folders) and re-run `kneeoa prepare`, which then splits by patient (data.split_fractions).")


def validate_manifest(df: pd.DataFrame, origin: str = "manifest") -> pd.DataFrame:
    """Check the manifest contract and return the table with canonical dtypes.

    Raises:
        ManifestError: naming the row, image_id and column of the first violation, and the fix.
        LeakageError: a patient in two splits.
    """
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ManifestError(f"{origin}: missing required column(s) {missing}; a manifest needs {list(REQUIRED)}.")
    df = df.reset_index(drop=True).copy()
    for col in ("image_id", "patient_id", "image_path", "split", "side", "source"):
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if empty.any():
            i = empty[empty].index[0]
            raise ManifestError(f"{_where(df, i, origin)}: column '{col}' is empty; every image needs one.")
        df[col] = df[col].astype(str)
    dup = df["image_id"].duplicated(keep=False)
    if dup.any():
        i = dup[dup].index[1] if dup.sum() > 1 else dup[dup].index[0]
        raise ManifestError(f"{_where(df, i, origin)}: column 'image_id' repeats an earlier row; image ids must be "
                            "unique (add the visit or side to the id).")
    for col, allowed in (("split", SPLITS), ("side", SIDES)):
        bad = ~df[col].isin(allowed)
        if bad.any():
            i = bad[bad].index[0]
            raise ManifestError(f"{_where(df, i, origin)}: column '{col}' is {df.at[i, col]!r}; expected one of "
                                f"{list(allowed)}.")
    visit = pd.to_numeric(df["visit"], errors="coerce")
    if visit.isna().any():
        i = visit[visit.isna()].index[0]
        raise ManifestError(f"{_where(df, i, origin)}: column 'visit' is {df.at[i, 'visit']!r}; visits are integers.")
    df["visit"] = visit.astype("int64")
    if df["low_quality"].isna().any() or not set(df["low_quality"].unique()) <= {True, False}:
        raise ManifestError(f"{origin}: column 'low_quality' must be true/false on every row.")
    df["low_quality"] = df["low_quality"].astype(bool)
    if "mirrored" in df:
        df["mirrored"] = df["mirrored"].fillna(False).astype(bool)
    if "klg" in df:
        _check_range(df, "klg", 0, 4, origin, "KL grades")
        df["klg"] = pd.to_numeric(df["klg"]).astype("Int64")
    for col in RAW_GRADE_COLUMNS:
        if col in df:
            _check_range(df, col, 0, 3, origin, "OARSI grades")
            df[col] = pd.to_numeric(df[col]).astype("Int64")
    for name, task in TASKS.items():
        if task.sources and name in df:
            _check_range(df, name, 0, task.n_classes - 1, origin, f"'{name}' labels")
            df[name] = pd.to_numeric(df[name]).astype("Int64")
    check_no_leakage(df, origin)
    return df


def write_manifest(df: pd.DataFrame, run_dir: Path) -> Path:
    """Validate and atomically write RUN_DIR/manifest.parquet."""
    df = validate_manifest(df, origin=f"manifest for {run_dir}")
    return write_parquet(df, Path(run_dir) / MANIFEST_NAME)


def read_manifest(run_dir: Path) -> pd.DataFrame:
    """Read and validate RUN_DIR/manifest.parquet."""
    path = Path(run_dir) / MANIFEST_NAME
    if not path.exists():
        raise ManifestError(f"{path} does not exist. Create it first with `kneeoa phantom`, `kneeoa prepare ...` "
                            "or `kneeoa demo`.")
    return validate_manifest(read_table(path, "kneeoa prepare"), origin=str(path))



def resolve_image_path(run_dir: Path, image_path: str) -> Path:
    p = Path(image_path)
    return p if p.is_absolute() else Path(run_dir) / p


def mark_mirrored(df: pd.DataFrame, mirror_left: bool) -> pd.DataFrame:
    """Set the `mirrored` column: left knees when `mirror_left`, else none (files on disk are never changed)."""
    return df.assign(mirrored=(df["side"] == "L") & bool(mirror_left))


def load_knee(run_dir: Path, row) -> np.ndarray:
    """A manifest row's image as every stage sees it: float (H, W) in [0, 1], flipped when the row is `mirrored`."""
    from kneeoa.formats.images import load_gray
    from kneeoa.transforms.preprocess import mirror

    img = load_gray(resolve_image_path(run_dir, row["image_path"]))
    return mirror(img) if bool(row.get("mirrored", False)) else img
