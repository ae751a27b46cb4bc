"""The report's core sections: summary, arm status, the paper-style results table, data, confusion matrices,
ROC curves and the exact config with package versions."""

from __future__ import annotations

import html
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from kneeoa.config import Config, dump_config
from kneeoa.plotting import new_figure
from kneeoa.report.figures import fig_to_img_tag, table_html
from kneeoa.report.formatting import format_ci
from kneeoa.runfolder.arms import read_arms
from kneeoa.runfolder.manifest import read_data_report, read_manifest
from kneeoa.runfolder.metrics import read_metrics
from kneeoa.runfolder.predictions import list_predictions, prob_columns, read_predictions
from kneeoa.runfolder.tables import read_table
from kneeoa.stats.metrics import METRICS
from kneeoa.tasks import get_task, primary_task

PACKAGES = ("kneeoa", "torch", "torchvision", "timm", "lightning", "open_clip_torch", "transformers", "xgboost-cpu",
            "scikit-learn", "grad-cam", "pydicom", "numpy", "pandas")


def summary_section(run_dir: Path, cfg: Config) -> str | None:
    m = read_metrics(run_dir)
    test = m[m["split"] == "test"]
    headline = ", ".join(f"{t} {get_task(t).headline_metric}" for t in cfg.tasks.names)
    lines = [f"<p>Study <b>{html.escape(cfg.name)}</b>, data source <b>{html.escape(cfg.data.source)}</b>. "
             f"Headline metric per task (test split): {html.escape(headline)}.</p>"]
    for task in cfg.tasks.names:
        metric = get_task(task).headline_metric
        rows = test[(test["task"] == task) & (test["metric"] == metric)].dropna(subset=["value"])
        if len(rows):
            best = rows.loc[rows["value"].idxmax()]
            lines.append(f"<li>{task}: best arm <b>{best['arm']}</b>, {metric} "
                         f"{format_ci(best['value'], best['ci_low'], best['ci_high'])}</li>")
    return "<h2>Summary</h2>" + lines[0] + "<ul>" + "".join(lines[1:]) + "</ul>"


def arms_section(run_dir: Path, cfg: Config) -> str | None:
    arms = read_arms(run_dir)
    if not arms:
        return None
    rows = [{"arm": a, "status": "ran" if r["status"] == "ran" else "NOT RUN",
             "starting weights / reason": r["weights"] if r["status"] == "ran" else r["reason"]}
            for a, r in sorted(arms.items())]
    return ("<h2>Arms</h2><p>Where each arm's weights came from. An arm that did not run reports no numbers.</p>"
            + table_html(pd.DataFrame(rows)))


def results_table(m: pd.DataFrame, split: str, tasks: list[str]) -> pd.DataFrame:
    """Arms x tasks, the headline metric of each task with its CI (the paper's table layout)."""
    part = m[m["split"] == split]
    out = {}
    for task in tasks:
        metric = get_task(task).headline_metric
        sel = part[(part["task"] == task) & (part["metric"] == metric)]
        out[f"{task} ({metric})"] = {r["arm"]: format_ci(r["value"], r["ci_low"], r["ci_high"])
                                     for _, r in sel.iterrows()}
    return pd.DataFrame(out).rename_axis("arm")


def results_section(run_dir: Path, cfg: Config) -> str | None:
    m = read_metrics(run_dir)
    m = m[m["metric"].isin(METRICS.names())]
    if m.empty:
        return "<h2>Results</h2><p>No arm produced predictions.</p>"
    tasks = [t for t in cfg.tasks.names if t in set(m["task"])]
    parts = ["<h2>Results</h2>"]
    for split in ("test", "val"):
        parts.append(f"<h3>Headline metrics, {split} split</h3>" + table_html(results_table(m, split, tasks),
                                                                               index=True))
    for task in tasks:
        sel = m[(m["task"] == task) & (m["split"] == "test")]
        if sel.empty:
            continue
        wide = sel.assign(cell=[format_ci(v, lo, hi) for v, lo, hi in zip(sel["value"], sel["ci_low"],
                                                                          sel["ci_high"], strict=True)])
        wide = wide.pivot(index="arm", columns="metric", values="cell")
        parts.append(f"<h3>{task}: all metrics (test, n={int(sel['n'].iloc[0])})</h3>" + table_html(wide, index=True))
    return "".join(parts)


def data_section(run_dir: Path, cfg: Config) -> str | None:
    man = read_manifest(run_dir)
    parts = ["<h2>Data</h2>", f"<p>{len(man)} knee images of {man['patient_id'].nunique()} patients; "
             f"{int(man['low_quality'].sum())} flagged low quality. Splits are by patient.</p>"]
    primary = primary_task()
    for task in [primary, *[t for t in cfg.tasks.names if t != primary]]:
        if task in man and man[task].notna().any():
            tab = pd.crosstab(man[task], man["split"], margins=True, margins_name="all")
            parts.append(f"<h3>{task}: images per grade and split</h3>" + table_html(tab, index=True))
        else:
            parts.append(f"<p>{task}: no labels in this dataset (task not available).</p>")
    rep = read_data_report(run_dir)
    if rep is not None:
        miss = pd.DataFrame([rep["label_missing_share"]]).T.rename(columns={0: "share missing"})
        parts.append("<h3>Label missingness</h3>" + table_html(miss, index=True))
        for key, title in (("quarantine", "Quarantined items"), ("unmatched", "Unmatched readings and images")):
            items = pd.DataFrame(rep.get(key, []))
            parts.append(f"<h3>{title}: {len(items)}</h3>" + (table_html(items.head(200)) if len(items) else ""))
        if rep.get("notes"):
            parts.append("<ul>" + "".join(f"<li>{html.escape(str(n))}</li>" for n in rep["notes"]) + "</ul>")
    return "".join(parts)


def _tables(run_dir: Path):
    for path in list_predictions(run_dir):
        arm, task, table = read_predictions(path)
        yield arm, task, table[table["split"] == "test"]


def confusion_section(run_dir: Path, cfg: Config) -> str | None:
    from kneeoa.stats.metrics import confusion

    imgs = []
    for arm, task, test in _tables(run_dir):
        if test.empty or not get_task(task).learned:
            continue
        t = get_task(task)
        cm = confusion(test["y_true"].to_numpy(), test[prob_columns(t.n_classes)].to_numpy(), test["y_pred"].to_numpy())
        fig = new_figure(3.2, 2.8)
        ax = fig.add_subplot()
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if v > cm.max() / 2 else "black")
        ax.set_xticks(range(t.n_classes), t.classes, fontsize=7)
        ax.set_yticks(range(t.n_classes), t.classes, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{arm} / {task}", fontsize=9)
        imgs.append(fig_to_img_tag(fig, alt=f"confusion {arm} {task}"))
    return "<h2>Confusion matrices (test)</h2><div class='grid'>" + "".join(imgs) + "</div>" if imgs else None


def roc_section(run_dir: Path, cfg: Config) -> str | None:
    """Plain ROC curves, for runs without the `stats` stage (whose section draws them with CI bands)."""
    from sklearn.metrics import roc_curve

    if read_table(run_dir, "roc_bands.csv") is not None:
        return None

    by_task: dict[str, list] = {}
    for arm, task, test in _tables(run_dir):
        if get_task(task).kind == "binary" and test["y_true"].nunique() == 2:
            by_task.setdefault(task, []).append((arm, test))
    imgs = []
    for task, entries in by_task.items():
        fig = new_figure(3.6, 3.4)
        ax = fig.add_subplot()
        for arm, test in entries:
            fpr, tpr, _ = roc_curve(test["y_true"], test["prob_1"])
            ax.plot(fpr, tpr, label=arm)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"ROC, {task} (test)", fontsize=9)
        ax.legend(fontsize=7)
        imgs.append(fig_to_img_tag(fig, alt=f"roc {task}"))
    return "<h2>ROC curves (test)</h2><div class='grid'>" + "".join(imgs) + "</div>" if imgs else None


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def config_section(run_dir: Path, cfg: Config) -> str | None:
    versions = pd.DataFrame(package_versions().items(), columns=["package", "version"])
    return ("<h2>Exact configuration</h2><pre>" + html.escape(dump_config(cfg)) + "</pre>"
            "<h3>Package versions</h3>" + table_html(versions))
