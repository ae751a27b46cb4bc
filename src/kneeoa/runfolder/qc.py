"""Zero-shot anatomy QC (owner: `zeroshot`): RUN_DIR/qc/zeroshot.parquet, one row per manifest image, and the
summary RUN_DIR/zeroshot_qc.json (shares identified overall and by `low_quality`, worst misses).

The QC is a table of its own keyed by `image_id`, so the manifest written by `prepare` is never rewritten by a later
stage. Columns: `image_id` (str), `zs_knee_prob` (float, probability of the knee label), `zs_is_knee` (bool, the
knee label is the top label), `top_label` (str).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from kneeoa.errors import ManifestError
from kneeoa.io import write_json, write_parquet

QC_TABLE = Path("qc") / "zeroshot.parquet"
QC_SUMMARY = "zeroshot_qc.json"
QC_COLUMNS = ("image_id", "zs_knee_prob", "zs_is_knee", "top_label")


def write_zeroshot_qc(table: pd.DataFrame, summary: dict[str, Any], run_dir: Path) -> Path:
    path = Path(run_dir) / QC_TABLE
    missing = [c for c in QC_COLUMNS if c not in table]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {missing}; the zero-shot QC table needs {list(QC_COLUMNS)}.")
    write_parquet(table[list(QC_COLUMNS)], path)
    write_json(summary, Path(run_dir) / QC_SUMMARY)
    return path


def read_zeroshot_qc(run_dir: Path) -> pd.DataFrame:
    path = Path(run_dir) / QC_TABLE
    if not path.exists():
        raise ManifestError(f"{path} does not exist. Make it with `kneeoa zeroshot {run_dir}`.")
    return pd.read_parquet(path)


def read_zeroshot_summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / QC_SUMMARY
    return json.loads(path.read_text()) if path.exists() else None
