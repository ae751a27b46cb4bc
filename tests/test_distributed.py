"""The distributed path: a `kneeoa run` study with two CPU processes (DDP over gloo) runs every stage but training
once and writes one complete set of outputs from rank 0; an unreachable hub is detected once, fast; and the quick
demo is deterministic."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from kneeoa.cli.app import app
from kneeoa.models import hub
from kneeoa.runfolder.arms import read_arms
from kneeoa.runlock import LOCK_NAME

STUDY = {"name": "ddp", "seed": 0, "stages": ["prepare", "train", "evaluate"],
         "data": {"source": "phantom", "patients": 12, "visits": 1, "image_size": 64, "workers": 1},
         "tasks": {"names": ["klg"]},
         "cnn": {"backbones": ["resnet18"], "image_size": 32, "epochs": 2, "batch_size": 8, "precision": "32-true",
                 "accelerator": "cpu", "devices": 2, "strategy": "ddp", "pretrained": "auto"}}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_ddp_study_runs_each_other_stage_once_and_only_rank_zero_writes(tmp_path):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "250", "HF_HUB_OFFLINE": "1"}
    kneeoa = str(Path(sys.executable).parent / "kneeoa")  # Lightning re-runs this command line for rank 1
    t0 = time.monotonic()
    proc = subprocess.run([kneeoa, "run", str(tmp_path / "study.yaml"), "--out", str(run)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1400)
    wall = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "GLOBAL_RANK: 1" in out and out.count("rank 1: joining train only") == 1
    for stage in ("prepare", "evaluate"):
        assert out.count(f"stage {stage} ...") == 1, stage  # rank 1 ran neither
    assert out.count("stage train ...") == 2
    manifest_written = (run / "manifest.parquet").stat().st_mtime
    assert manifest_written < (run / "checkpoints" / "resnet18" / "multitask.pt").stat().st_mtime  # not re-prepared
    assert read_arms(run)["resnet18"]["status"] == "ran"
    m = pd.read_csv(run / "metrics.csv")
    assert set(m["arm"]) == {"resnet18"} and set(m["split"]) == {"val", "test"}
    assert m.duplicated(["arm", "task", "split", "metric"]).sum() == 0  # one set of outputs
    assert len(list(run.glob("logs/*/version_*"))) == 1
    assert not (run / LOCK_NAME).exists() and not list(run.rglob(".*.tmp"))
    print(f"DDP study (2 CPU processes, gloo): {wall:.0f} s wall")


def test_unreachable_hub_is_detected_once_fast_and_inherited(monkeypatch):
    calls = []

    def refuse(address, timeout):
        calls.append(address)
        raise OSError("unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.is_offline_mode", lambda: False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    hub._hub_reachable.cache_clear()
    try:
        assert hub.hub_offline() and hub.hub_offline()
        assert calls == [("huggingface.co", 443)]  # probed once
        assert os.environ["HF_HUB_OFFLINE"] == "1"  # processes started from here (other ranks) skip the probe
    finally:
        hub._hub_reachable.cache_clear()


@pytest.mark.slow
def test_quick_demo_twice_gives_identical_metrics(tmp_path):
    runner = CliRunner()
    for name in ("a", "b"):
        res = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
    a, b = (pd.read_csv(tmp_path / n / "metrics.csv") for n in ("a", "b"))
    pd.testing.assert_frame_equal(a, b)
