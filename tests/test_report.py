import base64
import re

import numpy as np
import pytest

from kneeoa.config import Config
from kneeoa.report.html import ReportError, build_report
from kneeoa.runfolder.arms import record_arm
from kneeoa.runfolder.predictions import make_prediction_table, write_predictions
from kneeoa.sources.manifest import read_manifest
from kneeoa.stages import evaluate
from kneeoa.tasks import get_task


def write_fake_predictions(run_dir, arm, noise, seed=0):
    """Prediction tables for every task: the truth plus `noise` (0 = perfect)."""
    man = read_manifest(run_dir)
    rng = np.random.default_rng(seed)
    for task in ("klg", "osteophytes", "jsn", "sclerosis"):
        k = get_task(task).n_classes
        y = man[task].to_numpy(dtype=int)
        logits = np.eye(k)[y] * 3 + rng.normal(0, noise, (len(y), k))
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        write_predictions(make_prediction_table(man["image_id"], man["split"], y, probs), run_dir, arm, task)


def test_report_is_self_contained_and_complete(tiny_run):
    write_fake_predictions(tiny_run, "resnet18", 0.5)
    write_fake_predictions(tiny_run, "convnext_small", 2.0, seed=1)
    record_arm(tiny_run, "resnet18", status="ran", weights="random init: no weights in the local cache")
    record_arm(tiny_run, "raddino_xgb", status="not_run", reason="no RAD-DINO weights: run `kneeoa models fetch`")
    cfg = Config()
    evaluate.run(tiny_run, cfg)
    page = build_report(tiny_run, cfg).read_text()
    assert "src=\"http" not in page and "<link" not in page  # nothing loaded from elsewhere
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) >= 8 + 3  # 8 confusion matrices + 3 ROC figures
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in imgs)
    assert "NOT RUN" in page and "no RAD-DINO weights" in page
    assert "random init: no weights in the local cache" in page
    assert "klg (kappa_quadratic)" in page and "jsn (auc)" in page
    assert "Package versions" in page and "timm" in page and "split_fractions" in page
    assert "images per grade and split" in page


def test_a_failing_section_does_not_sink_the_report(tiny_run, monkeypatch):
    from kneeoa.report.sections import SECTIONS

    def broken(run_dir, cfg):
        raise RuntimeError("boom in ROC")

    monkeypatch.setitem(SECTIONS._entries, "roc", broken)
    with pytest.raises(ReportError, match=r"report.html was written, but \d section\(s\) failed .*roc \(RuntimeError"):
        build_report(tiny_run, Config())
    page = (tiny_run / "report.html").read_text()
    assert "This section failed: boom in ROC" in page and "Exact configuration" in page


def test_row_12_report_with_a_failing_section_exits_non_zero(tiny_run, monkeypatch):
    from typer.testing import CliRunner

    from kneeoa.cli.app import app
    from kneeoa.report.sections import SECTIONS

    write_fake_predictions(tiny_run, "resnet18", 0.5)
    evaluate.run(tiny_run, Config())
    monkeypatch.setitem(SECTIONS._entries, "roc", lambda run_dir, cfg: 1 / 0)
    res = CliRunner().invoke(app, ["report", str(tiny_run)])
    assert res.exit_code == 2 and "1 section(s) failed" in res.output and (tiny_run / "report.html").exists()


def test_outputs_get_ordinary_permissions(tiny_run):
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    mode = stat.S_IMODE((tiny_run / "manifest.parquet").stat().st_mode)
    assert mode == 0o666 & ~mask
