"""Report section: the four-way picture of where pretraining helps knees.

General-domain foundation model (BiomedCLIP), chest-radiograph foundation model (RAD-DINO), a knee encoder pretrained
without labels on the run's own images (`kneeoa pretrain`), and the supervised CNN arms, with the random-weights
control of the knee encoder beside them: one row per registered encoder (its `<prefix>_xgb` arm, labelled with the
entry's `family`), then one per CNN backbone of the config. Each row is the arm's headline metric per task on
`stats.compare_split` with its patient-bootstrap CI; an arm without weights says "not run (no weights)" and its
reason, never a number.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from kneeoa.config import Config
from kneeoa.models.encoders.foundation import ENCODERS
from kneeoa.report.figures import table_html
from kneeoa.report.formatting import format_ci
from kneeoa.runfolder.arms import read_arms
from kneeoa.runfolder.metrics import read_metrics
from kneeoa.tasks import get_task


def _cell(m: pd.DataFrame, arm: str, task: str, split: str) -> str:
    metric = get_task(task).headline_metric
    row = m[(m["arm"] == arm) & (m["task"] == task) & (m["split"] == split) & (m["metric"] == metric)]
    if row.empty:
        return "no predictions"
    r = row.iloc[0]
    return f"{metric} {format_ci(r['value'], r['ci_low'], r['ci_high'])}"


def four_way_section(run_dir: Path, cfg: Config) -> str | None:
    """The four families side by side; None when the run has none of the embed+boost or knee-SSL arms."""
    run_dir = Path(run_dir)
    arms = read_arms(run_dir)
    rows_def = [(spec.family or spec.title, f"{spec.arm_prefix}_xgb") for _, spec in ENCODERS.items()]
    if not any(arm in arms for _, arm in rows_def):
        return None
    rows_def += [("supervised CNN", bb) for bb in cfg.cnn.backbones]
    metrics = read_metrics(run_dir)
    split = cfg.stats.compare_split
    rows = []
    for family, arm in rows_def:
        rec = arms.get(arm)
        row = {"family": family, "arm": arm}
        for task in cfg.tasks.names:
            if rec is None:
                row[task] = "not run (no weights)" if family != "supervised CNN" else "not run"
            elif rec["status"] != "ran":
                row[task] = f"not run (no weights): {rec['reason'][:120]}"
            else:
                row[task] = _cell(metrics, arm, task, split)
        rows.append(row)
    return (f"<h2>Where pretraining helps: general FM, chest FM, knee SSL, supervised CNN</h2><p>Each family's "
            f"headline metric on {html.escape(split)} with its patient-bootstrap 95 % CI. The knee encoder was "
            "pretrained without labels on this run's train images (`kneeoa pretrain`); its control is the same "
            "architecture with random weights through the same embed -> boost path.</p>"
            + table_html(pd.DataFrame(rows)))
