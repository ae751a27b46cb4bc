"""Report sections for the foundation-model arms: zero-shot anatomy QC and the embeddings behind the XGBoost arms.

Both say plainly when an arm did not run (missing weights) and why, instead of showing numbers.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from kneeoa.config import Config
from kneeoa.errors import DataError
from kneeoa.formats.images import load_gray
from kneeoa.models.encoders.foundation import encoder_arms, get_encoder_spec
from kneeoa.report.figures import array_to_img_tag, table_html
from kneeoa.runfolder.arms import read_arms
from kneeoa.runfolder.embeddings import read_embedding_info
from kneeoa.runfolder.manifest import resolve_image_path
from kneeoa.runfolder.qc import read_zeroshot_summary


def _not_run(arm: str, rec: dict) -> str:
    return f"<p class='err'><b>{html.escape(arm)}</b> did not run: {html.escape(rec.get('reason', ''))}</p>"


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.2f}%"


def _thumb(run_dir: Path, failure: dict) -> str:
    lines = [failure["image_id"], f"top: {failure['top_label']}", f"knee p={failure['zs_knee_prob']:.2f}"]
    lines += ["low quality"] if failure.get("low_quality") else []
    try:
        tag = array_to_img_tag(load_gray(resolve_image_path(run_dir, failure["image_path"])),
                               alt=failure["image_id"], width=120)
    except DataError:
        tag = "(image missing)"
    caption = "<br>".join(html.escape(str(line)) for line in lines)
    return f"<figure style='margin:0;font-size:11px'>{tag}<figcaption>{caption}</figcaption></figure>"


def zeroshot_section(run_dir: Path, cfg: Config, n_examples: int = 6) -> str | None:
    """Share of knee images the zero-shot encoder identifies as knee, overall and by the low-quality flag, with
    example misses."""
    run_dir = Path(run_dir)
    spec = get_encoder_spec(cfg.zeroshot.encoder)
    rec = read_arms(run_dir).get(spec.zeroshot_arm)
    qc = read_zeroshot_summary(run_dir)
    if rec is None and qc is None:
        return None
    head = f"<h2>Zero-shot {html.escape(spec.title)}: anatomy QC</h2>"
    if (rec is not None and rec["status"] == "not_run") or qc is None:
        return head + _not_run(spec.zeroshot_arm, rec or {"reason": "no zero-shot QC in this run"})
    rows = [{"images": "all", "n": qc["overall"]["n"], "identified as knee": _pct(qc["overall"]["share"])}]
    rows += [{"images": f"low_quality = {flag}", "n": v["n"], "identified as knee": _pct(v["share"])}
             for flag, v in qc["by_low_quality"].items()]
    labels = ", ".join(html.escape(label) for label in qc["labels"])
    body = (f"<p>Prompt template <code>{html.escape(qc['template'])}</code> over the labels {labels}; an image counts "
            f"as identified when <i>{html.escape(qc['knee_label'])}</i> is its top label (the paper reports 91.14% on "
            f"OAI). Weights: {html.escape(qc['model_id'])} revision {html.escape(qc['revision'])}.</p>"
            + table_html(pd.DataFrame(rows)))
    failures = qc["failures"][:n_examples]
    if failures:
        body += ("<p>Knee images the model did not identify, lowest knee probability first:</p><div class='grid'>"
                 + "".join(_thumb(run_dir, f) for f in failures) + "</div>")
    return head + body


def embeddings_section(run_dir: Path, cfg: Config) -> str | None:
    """Which encoder made each embedding (model id, revision, checksum, preprocessing, size) and the chosen heads."""
    run_dir = Path(run_dir)
    arms = read_arms(run_dir)
    parts = []
    for name in cfg.foundation.encoders:
        spec = get_encoder_spec(name)
        info = read_embedding_info(run_dir, spec.name)
        own = [a for a in encoder_arms(cfg.foundation, spec.name) if a in arms]
        if info is None:
            parts += [f"<h3>{html.escape(spec.title)}</h3>", *(_not_run(a, arms[a]) for a in own
                                                              if arms[a]["status"] == "not_run")]
            continue
        pre = info["preprocess"]
        facts = {"model id": info["model_id"], "revision": info["revision"], "weights sha256": info["checksum"][:16],
                 "weights from": f"{info['weights_source']} ({info['weights_path']})",
                 "features": f"{info['features']} ({info['dim']}-d)", "precision": info["precision"],
                 "preprocessing": (f"resize {pre['resize_mode']} {pre['size']} px ({pre['interpolation']}), crop "
                                   f"{pre['crop'][0]}x{pre['crop'][1]}, mean {pre['mean']}, std {pre['std']}; "
                                   f"read from {Path(pre['source']).name}"),
                 "images": info["n_images"], "licence": spec.licence, "paper": spec.paper}
        parts += [f"<h3>{html.escape(spec.title)}</h3>",
                  table_html(pd.DataFrame({"": list(facts), "value": [str(v) for v in facts.values()]}))]
        for arm in own:
            rec = arms[arm]
            if rec["status"] == "not_run":
                parts.append(_not_run(arm, rec))
                continue
            chosen = pd.DataFrame([{"task": t, **{k: v for k, v in c.items()}}
                                   for t, c in rec["details"].get("tasks", {}).items()])
            parts += [f"<p>{html.escape(arm)}: hyperparameters chosen on val</p>", table_html(chosen)]
    if not parts:
        return None
    return ("<h2>Foundation-model embeddings</h2><p>Frozen encoders; grayscale crops repeated to three channels and "
            "preprocessed as the weights' own configuration files say.</p>" + "".join(parts))
