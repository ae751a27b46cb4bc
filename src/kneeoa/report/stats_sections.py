"""Report sections for the statistics stage: comparisons, ROC bands, calibration.

Each reads the files the stage wrote through `kneeoa.runfolder` (comparisons.csv, roc_bands.csv, reliability.csv, the
stats metrics part) and returns None when they are absent, so a run without the stage simply omits the section. The
explain stage's section is `kneeoa.report.explain_sections`.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from kneeoa.config import Config
from kneeoa.plotting import new_figure, panels
from kneeoa.report.figures import fig_to_img_tag, table_html
from kneeoa.report.formatting import format_ci, format_p
from kneeoa.runfolder.metrics import read_metrics_part
from kneeoa.runfolder.tables import read_table
from kneeoa.stats.calibration import CALIBRATION_METRICS


def forest_plot(comp: pd.DataFrame):
    """Matplotlib figure: paired differences (arm A - arm B) with CIs, one line per comparison, by metric."""
    labels = [f"{r.task} {r.metric}: {r.arm_a} - {r.arm_b}" for r in comp.itertuples()]
    fig = new_figure(7.5, 0.28 * len(comp) + 1.0)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(comp))[::-1]
    colours = np.where(comp["p_holm"].to_numpy(dtype=float) < 0.05, "tab:red", "tab:blue")
    ax.hlines(y, comp["ci_low"], comp["ci_high"], color=colours)
    ax.scatter(comp["difference"], y, color=colours, zorder=3, s=14)
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel("difference (arm A - arm B), 95% CI; red: Holm-adjusted p < 0.05")
    return fig


def comparisons_section(run_dir: Path, cfg: Config) -> str | None:
    """Pairwise arm comparisons (DeLong / paired patient bootstrap, Holm-adjusted) as a table and forest plot."""
    comp = read_table(run_dir, "comparisons.csv")
    if comp is None:
        return None
    table = pd.DataFrame({
        "task": comp["task"], "metric": comp["metric"], "arm A": comp["arm_a"], "arm B": comp["arm_b"],
        "A - B [95% CI]": [format_ci(d, lo, hi) for d, lo, hi in zip(comp["difference"], comp["ci_low"],
                                                                      comp["ci_high"], strict=True)],
        "p": [format_p(p) for p in comp["p_value"]], "p (Holm)": [format_p(p) for p in comp["p_holm"]],
        "method": comp["method"], "images / patients": [f"{a} / {b}" for a, b in zip(comp["n_images"],
                                                                                   comp["n_patients"], strict=True)]})
    return ("<h2>Paired comparisons between arms</h2>"
            f"<p>Differences on the {html.escape(str(comp['split'].iloc[0]))} images both arms scored. Binary AUCs: "
            "DeLong's test with patient-clustered variance; other metrics: paired patient bootstrap "
            f"({cfg.stats.n_boot} resamples). p-values Holm-adjusted over all {len(comp)} comparisons.</p>"
            + table_html(table) + fig_to_img_tag(forest_plot(comp), alt="forest plot of paired differences"))


def roc_ci_section(run_dir: Path, cfg: Config) -> str | None:
    """ROC curves of binary tasks with pointwise patient-bootstrap bands, one panel per task."""
    bands = read_table(run_dir, "roc_bands.csv")
    if bands is None:
        return None
    tasks = sorted(bands["task"].unique())
    fig, axes = panels(len(tasks), 3.6)
    for ax, task in zip(axes, tasks, strict=True):
        for arm, b in bands[bands["task"] == task].groupby("arm"):
            (line,) = ax.plot(b["fpr"], b["tpr"], lw=1.2, label=arm)
            ax.fill_between(b["fpr"], b["tpr_low"], b["tpr_high"], color=line.get_color(), alpha=0.2, lw=0)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls=":")
        ax.set(title=task, xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return (f"<h2>ROC curves with {int(cfg.stats.confidence * 100)}% bands</h2><p>Pointwise percentile bands of "
            f"sensitivity at fixed 1 - specificity, over {cfg.stats.n_boot} patient-level bootstrap resamples of the "
            f"{html.escape(str(bands['split'].iloc[0]))} set.</p>"
            + fig_to_img_tag(fig, alt="ROC curves with bootstrap bands"))


def calibration_section(run_dir: Path, cfg: Config) -> str | None:
    """Reliability diagrams per task on the comparison split, with ECE and Brier (lower is better) and CIs."""
    rel = read_table(run_dir, "reliability.csv")
    metrics = read_metrics_part(run_dir, "stats")
    if rel is None or metrics.empty:
        return None
    split = cfg.stats.compare_split
    rel = rel[rel["split"] == split]
    if rel.empty:
        return None
    tasks = sorted(rel["task"].unique())
    fig, axes = panels(len(tasks), 3.4)
    for i, (ax, task) in enumerate(zip(axes, tasks, strict=True)):
        for arm, r in rel[rel["task"] == task].groupby("arm"):
            ax.plot(r["confidence"], r["observed"], marker="o", ms=3, lw=1, label=arm)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls=":")
        ax.set(title=task, xlabel="predicted probability" if i == 0 else "", ylabel="observed frequency",
               xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    m = metrics[metrics["metric"].isin(CALIBRATION_METRICS) & (metrics["split"] == split)]
    wide = (m.assign(cell=[format_ci(v, lo, hi) for v, lo, hi in zip(m["value"], m["ci_low"], m["ci_high"],
                                                                    strict=True)])
            .pivot_table(index=["task", "arm"], columns="metric", values="cell", aggfunc="first").reset_index())
    wide.columns.name = None
    return ("<h2>Calibration</h2><p>Reliability diagrams on the "
            f"{html.escape(split)} set ({cfg.stats.calibration_bins} equal-width bins; binary tasks: probability "
            "of 'present'; KLG: top-label confidence). ECE and Brier score are losses (lower is better), with "
            "patient-bootstrap CIs.</p>" + fig_to_img_tag(fig, alt="reliability diagrams") + table_html(wide))
