"""Report section for the explain stage: where every arm looks, as Grad-CAM and occlusion montages, and how well the
maps find the phantom's features.

It reads the figure folders (`kneeoa.runfolder.montages`: GRADCAM, OCCLUSION) and the explain metrics part,
and returns None when the stage has not run.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from kneeoa.config import Config
from kneeoa.report.figures import png_tag, table_html
from kneeoa.report.formatting import format_ci
from kneeoa.runfolder.metrics import read_metrics_part
from kneeoa.runfolder.montages import GRADCAM, OCCLUSION, MontageFolder

#: The kinds of map, as the report names them, with their folders; montages of one arm x task sit side by side.
KINDS: tuple[tuple[str, MontageFolder], ...] = (("Grad-CAM", GRADCAM), ("occlusion", OCCLUSION))


def _score_table(scores: pd.DataFrame) -> str:
    """One row per task x arm: each score with its CI, and how many images each kind of map was scored on."""
    cells = scores.assign(cell=[format_ci(v, lo, hi) for v, lo, hi in zip(scores["value"], scores["ci_low"],
                                                                           scores["ci_high"], strict=True)])
    wide = (cells.pivot_table(index=["task", "arm"], columns="metric", values="cell", aggfunc="first")
            .reindex(columns=list(dict.fromkeys(scores["metric"]))))
    n = (scores.assign(kind=scores["metric"].str.partition("_")[0] + " images")
         .pivot_table(index=["task", "arm"], columns="kind", values="n", aggfunc="first").astype("Int64"))
    table = wide.join(n).reset_index()
    table.columns.name = None
    return table_html(table)


def _montages(run_dir: Path, indexes: dict[str, dict]) -> list[str]:
    """Per arm x task, its montages of every kind side by side (an arm with one kind shows that one alone)."""
    figures: dict[tuple[str, str], list[tuple[str, Path]]] = {}
    for title, index in indexes.items():
        for m in index.get("montages", []):
            path = Path(run_dir) / m["file"]
            if path.exists():
                figures.setdefault((m["arm"], m["task"]), []).append((title, path))
    parts = []
    for (arm, task), figs in sorted(figures.items()):
        width = 900 if len(figs) == 1 else 620
        tags = "".join(f"<figure>{png_tag(p.read_bytes(), alt=f'{t} {arm} {task}', width=width)}"
                       f"<figcaption>{html.escape(t)}</figcaption></figure>" for t, p in figs)
        parts.append(f"<h3>{html.escape(arm)} - {html.escape(task)}</h3><div class=\"grid\">{tags}</div>")
    return parts


def _skipped(indexes: dict[str, dict]) -> list[str]:
    """Arms a kind of map could not explain, one line per kind x arm x reason with the tasks it concerns."""
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for title, index in indexes.items():
        for s in index.get("skipped", []):
            grouped.setdefault((title, s["arm"], s["reason"]), []).append(s["task"])
    return [f"<p>No {html.escape(title)} maps for {html.escape(arm)} ({html.escape(', '.join(tasks))}): "
            f"{html.escape(reason)}</p>" for (title, arm, reason), tasks in grouped.items()]


def explain_section(run_dir: Path, cfg: Config) -> str | None:
    """Grad-CAM and occlusion montages per arm x task, their mask scores next to random-map baselines, and the arms
    that could not be explained, with why."""
    indexes = {title: index for title, folder in KINDS if (index := folder.read_index(run_dir)) is not None}
    if not indexes:
        return None
    parts = ["<h2>Where the arms look (Grad-CAM and occlusion maps)</h2>"
             "<p>Grad-CAM (CNN arms, and linear-probe arms through their encoder) weighs a block's maps by their "
             "gradient for the predicted class. An occlusion map (every arm whose model can be re-run, "
             "foundation-model arms re-embedded) covers the crop with a sliding patch of its mean intensity and "
             "shows where that lowers the predicted class's "
             "probability most. Both kinds show the same knees.</p>"]
    scores = read_metrics_part(run_dir, "explain")
    if len(scores):
        parts.append("<p>Scored on test images whose feature mask is non-empty (phantom): share of the map's energy "
                     "in the feature's mask and pointing-game hit rate, each next to a random map of matched "
                     "smoothness. KLG uses the union of the feature masks.</p>" + _score_table(scores))
    parts += _montages(run_dir, indexes) + _skipped(indexes)
    return "".join(parts) if len(parts) > 1 else None
