"""Contracts between the parts: run-folder files with one owner, stages that read only their declared inputs and
write only their declared outputs, and registries that take new entries at runtime with no other edit. (The import
layers and the shape of the tree are `tests/test_architecture.py`.)"""

from __future__ import annotations

import hashlib
import shutil
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import kneeoa
from conftest import contract_config
from kneeoa.config import Config
from kneeoa.errors import MissingInputError
from kneeoa.runfolder import RUN_FILES
from kneeoa.runfolder.predictions import list_predictions, prediction_path
from kneeoa.stages import STAGES, get_stage
from kneeoa.study import run_study

PACKAGE = Path(kneeoa.__file__).parent

# ------------------------------------------------------------------------------------------- run-folder owners


def test_each_file_is_written_by_exactly_the_stages_that_own_it():
    for name, f in RUN_FILES.items():
        writers = {s for s, spec in STAGES.items() if name in spec.writes}
        assert writers == set(f.owners) - {"run"}, name


def test_stage_declarations_name_only_registered_files():
    from kneeoa.stages import StageSpec

    with pytest.raises(Exception, match="Unknown run-folder file 'manifests'. .*Did you mean 'manifest'"):
        StageSpec("x:y", needs=("manifests",))


# --------------------------------------------------------------------------------- a finished tiny phantom run


def _files(run: Path) -> dict[str, str]:
    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def _declared(rel: str, names) -> bool:
    return any(fnmatch(rel, RUN_FILES.get(n).pattern) for n in names)


def test_every_file_of_a_finished_run_is_a_registered_run_file(finished_run):
    run, _ = finished_run
    undeclared = [rel for rel in _files(run) if not _declared(rel, RUN_FILES.names())]
    assert not undeclared
    assert {"biomedclip_zeroshot", "raddino_xgb", "resnet18"} <= {p.name.split("__")[0]
                                                                  for p in list_predictions(run)}


@pytest.mark.parametrize("stage", [s for s in STAGES if s != "prepare"])
def test_a_stage_alone_reads_only_its_inputs_and_writes_only_its_outputs(stage, finished_run, tmp_path):
    """Every file the stage does not declare it needs or reads is removed first, and so are its own earlier outputs
    (it starts afresh); it must still run, change only files it declares it writes, and (where it is deterministic)
    write what it wrote inside the whole study."""
    full, cfg = finished_run
    spec = STAGES.get(stage)
    run = tmp_path / "run"
    shutil.copytree(full, run)
    for rel in _files(run):
        if not _declared(rel, (*spec.needs, *spec.reads)) or (_declared(rel, spec.writes)
                                                               and not _declared(rel, spec.needs)):
            (run / rel).unlink()
    before = _files(run)
    get_stage(stage)(run, cfg)
    after = _files(run)
    changed = {rel for rel in before.keys() | after.keys() if before.get(rel) != after.get(rel)}
    assert changed, f"{stage} wrote nothing"
    stray = sorted(rel for rel in changed if not _declared(rel, spec.writes))
    assert not stray, f"{stage} changed files it does not declare: {stray}"
    for rel in ("metrics/evaluate.csv", "metrics/stats.csv", "comparisons.csv", "metrics/explain.csv"):
        if _declared(rel, spec.writes):
            assert after[rel] == _files(full)[rel], f"{stage}: {rel} differs from the study's"


@pytest.mark.parametrize(("stage", "need"), [(s, n) for s, spec in STAGES.items() for n in spec.needs])
def test_a_stage_without_an_input_refuses_and_writes_nothing(stage, need, finished_run, tmp_path):
    full, cfg = finished_run
    run = tmp_path / "run"
    shutil.copytree(full, run)
    for path in RUN_FILES.get(need).paths(run):
        path.unlink()
    before = _files(run)
    with pytest.raises(MissingInputError, match=rf"{stage}.*{RUN_FILES.get(need).pattern.split('*')[0]}"):
        get_stage(stage)(run, cfg)
    assert _files(run) == before


def test_a_study_is_refused_before_it_writes_when_a_stage_would_lack_an_input(tmp_path):
    cfg = Config()
    with pytest.raises(MissingInputError, match="`kneeoa evaluate`"):
        run_study(cfg, tmp_path / "run", stages=["evaluate", "report"])
    assert not (tmp_path / "run").exists()


def test_stats_then_evaluate_keeps_every_interval_and_zeroshot_keeps_the_manifest(finished_run, tmp_path):
    full, cfg = finished_run
    run = tmp_path / "run"
    shutil.copytree(full, run)
    manifest = (run / "manifest.parquet").read_bytes()
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["ci_low"].notna().mean() > 0.5
    for stage in ("zeroshot", "stats", "evaluate"):
        get_stage(stage)(run, cfg)
    assert (run / "manifest.parquet").read_bytes() == manifest
    pd.testing.assert_frame_equal(pd.read_csv(run / "metrics.csv"), metrics)


# ------------------------------------------------------------------------- new registry entries, added at runtime


class _ToyNet(nn.Module):
    """Two convolutions and global pooling: a backbone small enough to train in a second."""

    def __init__(self, in_chans: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.num_features = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.block(torch.relu(self.stem(x)))).mean(dim=(2, 3))


def _toy_encoder_parts(spec, snap, features, device):
    from kneeoa.models.encoders.base import Encoder
    from kneeoa.transforms.preprocess import Preprocess

    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, spec.features[features])).to(device)
    pre = Preprocess(32, (32, 32), (0.5,) * 3, (0.25,) * 3, "bilinear", "squash", str(snap.path / "toy.json"))
    return {"cls": Encoder, "model": model, "forward": model, "preprocess": pre, "dim": spec.features[features]}


@pytest.fixture
def toy_entries(tmp_path):
    """A backbone, an encoder (with its library loader) and a task, registered for the test and removed after."""
    from kneeoa.models.cnn.backbones import BACKBONES, Backbone
    from kneeoa.models.encoders.foundation import ENCODERS
    from kneeoa.models.encoders.loaders import LOADERS, Library
    from kneeoa.models.encoders.spec import EncoderSpec
    from kneeoa.models.hub import Layout
    from kneeoa.tasks import JSN_SITES, TASKS, Task

    snapshot = tmp_path / "toy-encoder"
    snapshot.mkdir()
    (snapshot / "toy.json").write_text("{}")
    (snapshot / "weights.bin").write_bytes(b"toy")
    added = [
        (BACKBONES, "toynet", Backbone("toynet", None, False, {"last": lambda m: m.block, "penultimate": lambda m:
                                                               m.stem}, build=lambda n, s, t, c: _ToyNet(c))),
        (LOADERS, "toylib", Library(_toy_encoder_parts)),
        (ENCODERS, "toyenc", EncoderSpec("toyenc", "Toy encoder", "example/toy", "toylib", "toyenc", {"pooled": 8},
                                         Layout(("toy.json",), (("weights.bin",),)), ("weights.bin",), "toy.json",
                                         "none", "none")),
        (TASKS, "jsn_severe", Task("jsn_severe", "binary", ("absent", "present"), JSN_SITES, "any", threshold=2,
                                   headline="balanced_accuracy", masks=("jsn",))),
    ]
    for registry, name, entry in added:
        registry.add(name, entry)
    try:
        yield snapshot
    finally:
        for registry, name, _ in added:
            registry.remove(name)


def test_a_new_backbone_encoder_and_task_need_no_other_edit(toy_entries, tmp_path):
    run = tmp_path / "run"
    cfg = contract_config({})
    cfg.tasks.names = ["klg", "jsn_severe"]
    cfg.cnn.backbones = ["toynet"]
    cfg.foundation.encoders, cfg.foundation.weights = ["toyenc"], {"toyenc": str(toy_entries)}
    cfg.fusion.arms = ["toynet", "toyenc_xgb"]
    cfg.zeroshot.enabled = False
    run_study(cfg, run)
    for arm in ("toynet", "toyenc_xgb", "fusion_stack", "fusion_features_xgb"):
        assert prediction_path(run, arm, "jsn_severe").exists(), arm
    metrics = pd.read_csv(run / "metrics.csv")
    toy = metrics[(metrics["task"] == "jsn_severe") & (metrics["split"] == "test")]
    assert {"toynet", "toyenc_xgb"} <= set(toy["arm"]) and "balanced_accuracy" in set(toy["metric"])
    assert set(metrics.loc[metrics["metric"].str.startswith("cam_"), "task"]) >= {"jsn_severe"}  # its masks
    report = (run / "report.html").read_text()
    assert "jsn_severe (balanced_accuracy)" in report and "Toy encoder" in report
    assert np.isfinite(toy.loc[toy["metric"] == "balanced_accuracy", "value"]).all()
