"""Stage `evaluate`: point metrics for every prediction table, on val and test.

Writes RUN_DIR/metrics.csv in long form (`arm,task,split,metric,value,ci_low,ci_high,n`; CIs are filled by the
`stats` stage) and RUN_DIR/metrics.json (the same values nested, plus confusion matrices). Rows of metrics that other
stages own (calibration, Grad-CAM scores) are kept when evaluate is re-run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kneeoa.config import Config
from kneeoa.io import write_json, write_text
from kneeoa.metrics import METRICS, confusion, metrics_for
from kneeoa.predictions import list_predictions, prob_columns, read_predictions
from kneeoa.tasks import get_task

METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
COLUMNS = ["arm", "task", "split", "metric", "value", "ci_low", "ci_high", "n"]
EVAL_SPLITS = ("val", "test")


def read_metrics(run_dir: Path) -> pd.DataFrame:
    path = Path(run_dir) / METRICS_CSV
    return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=COLUMNS)


def write_metrics(df: pd.DataFrame, run_dir: Path) -> Path:
    """Write metrics.csv atomically with exactly COLUMNS, sorted for stable diffs."""
    df = df[COLUMNS].sort_values(["arm", "task", "split", "metric"], kind="stable")
    return write_text(df.to_csv(index=False), Path(run_dir) / METRICS_CSV)


def evaluate_table(arm: str, task: str, table: pd.DataFrame) -> tuple[list[dict], dict]:
    """Metric rows and confusion matrices of one prediction table."""
    k = get_task(task).n_classes
    rows, confusions = [], {}
    for split in EVAL_SPLITS:
        part = table[table["split"] == split]
        if part.empty:
            continue
        y, probs, pred = part["y_true"].to_numpy(), part[prob_columns(k)].to_numpy(), part["y_pred"].to_numpy()
        for m in metrics_for(get_task(task)):
            rows.append({"arm": arm, "task": task, "split": split, "metric": m.name, "value": m.fn(y, probs, pred),
                         "ci_low": np.nan, "ci_high": np.nan, "n": len(part)})
        confusions[split] = confusion(y, probs, pred).tolist()
    return rows, confusions


def run(run_dir: Path, cfg: Config) -> None:
    run_dir = Path(run_dir)
    rows, nested = [], {}
    for path in list_predictions(run_dir):
        arm, task, table = read_predictions(path)
        r, conf = evaluate_table(arm, task, table)
        rows += r
        entry = nested.setdefault(arm, {}).setdefault(task, {})
        for row in r:
            entry.setdefault(row["split"], {})[row["metric"]] = row["value"]
        for split, cm in conf.items():
            entry.setdefault(split, {})["confusion_matrix"] = cm
    kept = read_metrics(run_dir)
    kept = kept[~kept["metric"].isin(METRICS.names())]
    out = pd.concat([kept, pd.DataFrame(rows, columns=COLUMNS)], ignore_index=True) if len(kept) else \
        pd.DataFrame(rows, columns=COLUMNS)
    write_metrics(out, run_dir)
    write_json(nested, run_dir / METRICS_JSON)
