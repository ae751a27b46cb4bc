"""The prediction table: the one format every arm writes and evaluation, statistics and the report read.

RUN_DIR/predictions/<arm>__<task>.parquet with columns:

| column    | dtype   | meaning                                               |
|-----------|---------|-------------------------------------------------------|
| image_id  | str     | manifest image id                                     |
| split     | str     | train / val / test (as in the manifest)               |
| y_true    | int64   | true class index                                      |
| prob_0 .. prob_{K-1} | float64 | class probabilities, rows sum to 1          |
| y_pred    | int64   | the arm's predicted class (its decoding: argmax, or val-tuned cut-points) |

K is the task's number of classes (`kneeoa.tasks`). A table written without `y_pred` (an older run) reads as the
argmax of the probabilities. Every metric of hard predictions uses `y_pred`. Arms with no result write nothing;
the reason they did not run lives in RUN_DIR/arms/<arm>.json (see `kneeoa.runfolder.arms`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kneeoa.errors import ManifestError
from kneeoa.io import read_table, write_parquet
from kneeoa.tasks import get_task

PREDICTIONS_DIR = "predictions"


def prob_columns(n_classes: int) -> list[str]:
    return [f"prob_{k}" for k in range(n_classes)]


def prediction_path(run_dir: Path, arm: str, task: str) -> Path:
    return Path(run_dir) / PREDICTIONS_DIR / f"{arm}__{task}.parquet"


def make_prediction_table(image_id, split, y_true, probs: np.ndarray, y_pred=None) -> pd.DataFrame:
    """Assemble a prediction table from arrays. probs: (n_images, n_classes) float, rows sum to 1; y_pred: the
    decoded classes (default: argmax of probs)."""
    probs = np.asarray(probs, dtype="float64")
    df = pd.DataFrame({"image_id": np.asarray(image_id, dtype=str), "split": np.asarray(split, dtype=str),
                       "y_true": np.asarray(y_true, dtype="int64")})
    for k, col in enumerate(prob_columns(probs.shape[1])):
        df[col] = probs[:, k]
    df["y_pred"] = np.asarray(probs.argmax(axis=1) if y_pred is None else y_pred, dtype="int64")
    return df


def validate_predictions(df: pd.DataFrame, task: str, origin: str = "prediction table") -> pd.DataFrame:
    """Check the prediction-table contract for `task`; raise ManifestError naming the row and column."""
    n = get_task(task).n_classes
    cols = ["image_id", "split", "y_true", *prob_columns(n)]
    missing = [c for c in cols if c not in df]
    if missing:
        raise ManifestError(f"{origin}: missing column(s) {missing}; task '{task}' needs {cols}.")
    extra = [c for c in df if c.startswith("prob_") and c not in cols]
    if extra:
        raise ManifestError(f"{origin}: column(s) {extra} do not fit task '{task}' ({n} classes).")
    if df["image_id"].duplicated().any():
        i = int(np.flatnonzero(df["image_id"].duplicated())[0])
        raise ManifestError(f"{origin} row {i}: image_id {df['image_id'].iloc[i]!r} appears twice.")
    y = pd.to_numeric(df["y_true"], errors="coerce")
    bad = y.isna() | (y < 0) | (y >= n)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ManifestError(f"{origin} row {i}: column 'y_true' is {df['y_true'].iloc[i]}; expected 0-{n - 1}.")
    p = df[prob_columns(n)].to_numpy(dtype="float64")
    bad_row = ~np.isfinite(p).all(axis=1) | (p < -1e-6).any(axis=1) | (np.abs(p.sum(axis=1) - 1) > 1e-3)
    if bad_row.any():
        i = int(np.flatnonzero(bad_row)[0])
        raise ManifestError(f"{origin} row {i}: probabilities {p[i].round(4).tolist()} are not a distribution "
                            "(finite, >= 0, summing to 1).")
    out = df[cols].copy()
    out["y_true"] = y.astype("int64")
    if "y_pred" not in df:
        out["y_pred"] = p.argmax(axis=1)
    else:
        pred = pd.to_numeric(df["y_pred"], errors="coerce")
        bad = pred.isna() | (pred < 0) | (pred >= n) | (pred % 1 != 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ManifestError(f"{origin} row {i}: column 'y_pred' is {df['y_pred'].iloc[i]}; expected 0-{n - 1}.")
        out["y_pred"] = pred.astype("int64").to_numpy()
    return out


def write_predictions(df: pd.DataFrame, run_dir: Path, arm: str, task: str) -> Path:
    path = prediction_path(run_dir, arm, task)
    return write_parquet(validate_predictions(df, task, origin=str(path)), path)


def read_predictions(path: Path) -> tuple[str, str, pd.DataFrame]:
    """Read one table; returns (arm, task, validated table)."""
    path = Path(path)
    arm, sep, task = path.stem.partition("__")
    if not sep:
        raise ManifestError(f"{path}: prediction tables are named <arm>__<task>.parquet.")
    return arm, task, validate_predictions(read_table(path, "kneeoa train (or boost, zeroshot) RUN_DIR"), task,
                                           origin=str(path))


def list_predictions(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / PREDICTIONS_DIR).glob("*__*.parquet"))
