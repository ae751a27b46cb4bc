"""Stage `evaluate`: point metrics for every prediction table, on val and test.

Writes its part of the metrics, RUN_DIR/metrics/evaluate.csv (long form `arm,task,split,metric,value,ci_low,ci_high,n`
with empty CIs; the `stats` stage owns the intervals), and RUN_DIR/metrics.json (the same values nested, plus
confusion matrices). The merged RUN_DIR/metrics.csv is rebuilt by `kneeoa.runfolder.metrics`, so re-running
evaluate keeps the intervals and the scores other stages wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kneeoa.config import Config
from kneeoa.io import write_json
from kneeoa.runfolder.metrics import COLUMNS, EVAL_SPLITS, METRICS_JSON, write_metrics_part
from kneeoa.runfolder.predictions import list_predictions, prob_columns, read_predictions
from kneeoa.stats.metrics import confusion, metrics_for
from kneeoa.tasks import get_task


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
    write_metrics_part(pd.DataFrame(rows, columns=COLUMNS), run_dir, "evaluate")
    write_json(nested, run_dir / METRICS_JSON)
