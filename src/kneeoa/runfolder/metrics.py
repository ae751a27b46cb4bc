"""Metrics: one part per owning stage, and the merged RUN_DIR/metrics.csv derived from them.

Each stage writes only its own part, RUN_DIR/metrics/<stage>.csv, in the long form `COLUMNS`:

* `evaluate`: point metrics (`value`, `n`; no intervals);
* `stats`: the same point metrics with patient-bootstrap CIs, and `ece` / `brier` rows;
* `explain`: the CAM-in-mask scores with their CIs.

RUN_DIR/metrics.csv is rebuilt from the parts after every write (`merged_metrics`): one row per (arm, task, split,
metric), `value` and `n` from the first part in `PART_ORDER` that has the row, and `ci_low`/`ci_high` from a part
whose value for that row is the same number. Re-running `evaluate` after `stats` therefore keeps every CI, and an
interval computed for other predictions (the value changed) is dropped rather than shown beside the wrong number.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kneeoa.errors import ManifestError, MissingInputError
from kneeoa.io import write_text

METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
PARTS_DIR = "metrics"
COLUMNS = ["arm", "task", "split", "metric", "value", "ci_low", "ci_high", "n"]
KEY = ["arm", "task", "split", "metric"]
#: The splits point metrics are reported on (train predictions are written, never scored).
EVAL_SPLITS = ("val", "test")
#: The stages that own a metrics part, in the order the merge trusts their values.
PART_ORDER = ("evaluate", "stats", "explain")


def part_path(run_dir: Path, stage: str) -> Path:
    if stage not in PART_ORDER:
        raise ValueError(f"Stage {stage!r} owns no metrics part; the owners are {', '.join(PART_ORDER)}.")
    return Path(run_dir) / PARTS_DIR / f"{stage}.csv"


def validate_metrics(df: pd.DataFrame, origin: str) -> pd.DataFrame:
    """Check the long-form columns and numeric types; return the table with exactly COLUMNS."""
    missing = [c for c in COLUMNS if c not in df]
    if missing:
        raise ManifestError(f"{origin}: missing column(s) {missing}; a metrics table needs {COLUMNS}.")
    df = df[COLUMNS].copy()
    for col in ("value", "ci_low", "ci_high"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    dup = df.duplicated(KEY)
    if dup.any():
        row = df[dup].iloc[0]
        raise ManifestError(f"{origin}: row {row[KEY].to_dict()} appears twice.")
    return df


def _csv(df: pd.DataFrame, path: Path) -> Path:
    df = df[COLUMNS].sort_values(KEY, kind="stable")
    return write_text(df.to_csv(index=False), path)


def write_metrics_part(df: pd.DataFrame, run_dir: Path, stage: str) -> Path:
    """Atomically replace `stage`'s part and rebuild RUN_DIR/metrics.csv; returns the part's path."""
    path = part_path(run_dir, stage)
    _csv(validate_metrics(pd.DataFrame(df, columns=COLUMNS), str(path)), path)
    _csv(merged_metrics(run_dir), Path(run_dir) / METRICS_CSV)
    return path


def read_metrics_part(run_dir: Path, stage: str) -> pd.DataFrame:
    path = part_path(run_dir, stage)
    if not path.exists():
        return pd.DataFrame(columns=COLUMNS)
    return validate_metrics(pd.read_csv(path), str(path))


def merged_metrics(run_dir: Path) -> pd.DataFrame:
    """Every stage's metrics in one table (see the module docstring for which part wins what)."""
    parts = [read_metrics_part(run_dir, s).assign(_order=i) for i, s in enumerate(PART_ORDER)]
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=COLUMNS)
    rows = pd.concat(parts, ignore_index=True).sort_values("_order", kind="stable")
    base = rows.drop_duplicates(KEY, keep="first").drop(columns=["ci_low", "ci_high"])
    ci = (rows.dropna(subset=["ci_low", "ci_high"]).drop_duplicates(KEY, keep="first")
          [[*KEY, "value", "ci_low", "ci_high"]].rename(columns={"value": "_ci_value"}))
    out = base.merge(ci, on=KEY, how="left")
    same = np.isclose(out["value"].to_numpy(float), out["_ci_value"].to_numpy(float), rtol=0, atol=1e-12,
                      equal_nan=True)
    out.loc[~same, ["ci_low", "ci_high"]] = np.nan
    return out[COLUMNS].reset_index(drop=True)


def read_metrics(run_dir: Path) -> pd.DataFrame:
    """All metrics of the run (merged from the parts; a run made before parts existed: its metrics.csv).

    Raises:
        MissingInputError: no stage has written metrics yet (names `kneeoa evaluate`).
    """
    run_dir = Path(run_dir)
    if any(part_path(run_dir, s).exists() for s in PART_ORDER):
        return merged_metrics(run_dir)
    legacy = run_dir / METRICS_CSV
    if legacy.exists():
        return validate_metrics(pd.read_csv(legacy), str(legacy))
    raise MissingInputError(f"{run_dir} has no metrics yet ({run_dir / PARTS_DIR}/<stage>.csv). Make them with "
                            f"`kneeoa evaluate {run_dir}`.")
