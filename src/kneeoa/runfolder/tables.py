"""The statistics stage's CSV tables (owner: `stats`): comparisons.csv, reliability.csv and roc_bands.csv, each with
its columns; read back by the report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kneeoa.errors import ManifestError
from kneeoa.io import write_text

TABLES: dict[str, tuple[str, ...]] = {
    "comparisons.csv": ("arm_a", "arm_b", "task", "metric", "difference", "ci_low", "ci_high", "p_value", "p_holm",
                        "method", "n_images", "n_patients", "split"),
    "reliability.csv": ("arm", "task", "split", "bin", "bin_low", "bin_high", "n", "confidence", "observed"),
    "roc_bands.csv": ("arm", "task", "split", "fpr", "tpr", "tpr_low", "tpr_high"),
}


def columns(name: str) -> list[str]:
    return list(TABLES[name])


def write_table(df: pd.DataFrame, run_dir: Path, name: str) -> Path:
    """Atomically write one of `TABLES` with exactly its columns."""
    missing = [c for c in TABLES[name] if c not in df]
    if missing:
        raise ManifestError(f"{Path(run_dir) / name}: missing column(s) {missing}.")
    return write_text(df[list(TABLES[name])].to_csv(index=False), Path(run_dir) / name)


def read_table(run_dir: Path, name: str) -> pd.DataFrame | None:
    """The table, or None when absent or empty (the stage did not run or had nothing to write)."""
    path = Path(run_dir) / name
    if not path.exists():
        return None
    df = pd.read_csv(path)
    return df if len(df) else None
