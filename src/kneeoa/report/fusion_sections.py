"""The report's fusion section: each fused arm against the best of its members, per task.

Reads the fused arms' records (RUN_DIR/arms/fusion_*.json: members, method), the merged metrics (the headline metric
on `stats.compare_split`, with CIs) and comparisons.csv (the paired patient-bootstrap differences, Holm-adjusted over
the whole file by the stats stage). The best member is the member with the highest headline value on that split.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from kneeoa.config import Config
from kneeoa.report.figures import table_html
from kneeoa.report.formatting import format_ci, format_p
from kneeoa.runfolder.arms import read_arms
from kneeoa.runfolder.metrics import read_metrics
from kneeoa.runfolder.tables import read_table
from kneeoa.tasks import get_task

_HOW = {"stack": "logistic stacker on the members' probabilities, cross-fitted on val by patient",
        "features": "member features concatenated into the {head} head, fitted on train, chosen on val"}


def _paired(comp: pd.DataFrame | None, fused: str, member: str, task: str, metric: str) -> pd.Series | None:
    """The comparisons.csv row of fused vs member for `metric`, signed fused - member; None when absent."""
    if comp is None:
        return None
    rows = comp[(comp["task"] == task) & (comp["metric"] == metric)]
    for a, b, sign in ((fused, member, 1), (member, fused, -1)):
        hit = rows[(rows["arm_a"] == a) & (rows["arm_b"] == b)]
        if len(hit):
            r = hit.iloc[0].copy()
            if sign < 0:
                r["difference"], r["ci_low"], r["ci_high"] = -r["difference"], -r["ci_high"], -r["ci_low"]
            return r
    return None


def _rows(fused: str, rec: dict, m: pd.DataFrame, comp: pd.DataFrame | None, split: str) -> list[dict]:
    details = rec.get("details", {})
    out = []
    for task in sorted(set(m.loc[m["arm"] == fused, "task"])):
        metric = get_task(task).headline_metric
        scores = m[(m["task"] == task) & (m["split"] == split) & (m["metric"] == metric)].set_index("arm")
        members = [a for a in details.get("members", []) if a in scores.index]
        if fused not in scores.index or not members:
            continue
        best = max(members, key=lambda a: scores.loc[a, "value"])
        cell = {a: format_ci(*scores.loc[a, ["value", "ci_low", "ci_high"]]) for a in (fused, best)}
        paired = _paired(comp, fused, best, task, metric)
        out.append({"task": task, "metric": metric, "fused arm": fused, "fused": cell[fused], "best member": best,
                    "member": cell[best],
                    "fused - member [95% CI]": format_ci(paired["difference"], paired["ci_low"], paired["ci_high"])
                    if paired is not None else "n/a",
                    "p": format_p(paired["p_value"]) if paired is not None else "n/a",
                    "p (Holm)": format_p(paired["p_holm"]) if paired is not None else "n/a"})
    return out


def fusion_section(run_dir: Path, cfg: Config) -> str | None:
    """Fused arms vs their best member (headline metric, paired patient bootstrap, Holm), and fused arms not run."""
    fused = {a: r for a, r in read_arms(run_dir).items() if r.get("details", {}).get("method") in _HOW
             or (a.startswith("fusion_") and r["status"] == "not_run")}
    if not fused:
        return None
    split = cfg.stats.compare_split
    m = read_metrics(run_dir)
    comp = read_table(run_dir, "comparisons.csv")
    rows = [row for arm, rec in sorted(fused.items()) if rec["status"] == "ran"
            for row in _rows(arm, rec, m, comp, split)]
    parts = ["<h2>Hybrid arms (fusion)</h2>",
             f"<p>Each fused arm against the best of its members on the {html.escape(split)} split (headline metric; "
             "paired patient bootstrap, p-values Holm-adjusted over every comparison of the run). The stacker's val "
             "predictions are cross-fitted by patient; a member's val figures may include choices tuned on val "
             "(cut-points, epoch), which favours the member.</p>"]
    how = [{"fused arm": a, "method": _HOW[r["details"]["method"]].format(head=r["details"].get("head", "")),
            "members": ", ".join(r["details"].get("members", [])), "inputs": r.get("weights", "")}
           for a, r in sorted(fused.items()) if r["status"] == "ran"]
    if how:
        parts.append(table_html(pd.DataFrame(how)))
    if rows:
        parts.append(table_html(pd.DataFrame(rows)))
    parts += [f"<p>{html.escape(a)} did not run: {html.escape(r['reason'])}</p>"
              for a, r in sorted(fused.items()) if r["status"] != "ran"]
    return "".join(parts)
