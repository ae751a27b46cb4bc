"""The stats stage: intervals, calibration and comparisons from the files of a run folder."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from kneeoa.config import Config
from kneeoa.errors import ManifestError, MissingInputError
from kneeoa.runfolder.predictions import make_prediction_table, read_predictions, write_predictions
from kneeoa.runfolder.tables import columns
from kneeoa.sources.manifest import write_manifest
from kneeoa.stages import get_stage
from kneeoa.stages import stats as stats_stage
from kneeoa.stats.calibration import CALIBRATION_METRICS
from kneeoa.tasks import get_task
from test_bootstrap import class_probs


def make_run(run_dir, arms, *, n_patients=40, seed=0, tasks=("osteophytes", "klg")):
    """A tiny run folder: manifest (2 knees per patient), predictions per arm x task, evaluated by `evaluate`."""
    rng = np.random.default_rng(seed)
    n = 2 * n_patients
    pid = np.repeat([f"P{i:03d}" for i in range(n_patients)], 2)
    split = np.where(np.arange(n) < n // 2, "val", "test")
    manifest = pd.DataFrame({
        "image_id": [f"{p}_{s}" for p, s in zip(pid, "RL" * n_patients, strict=True)], "patient_id": pid, "visit": 0,
        "side": list("RL" * n_patients), "image_path": [f"crops/{i}.png" for i in range(n)], "split": split,
        "low_quality": False, "source": "phantom", "klg": rng.integers(0, 5, n)})
    manifest["osteophytes"] = (manifest["klg"] >= 2).astype(int)
    write_manifest(manifest, run_dir)
    for a, arm in enumerate(arms):
        for task in tasks:
            y = manifest[task].to_numpy()
            probs = class_probs(rng, y, get_task(task).n_classes, signal=1.0 + a)
            write_predictions(make_prediction_table(manifest["image_id"], split, y, probs), run_dir, arm, task)
    get_stage("evaluate")(run_dir, Config())
    return manifest


def _cfg(n_boot=200):
    cfg = Config()
    cfg.stats.n_boot = n_boot
    return cfg


def test_stats_stage_two_arms(tmp_path):
    make_run(tmp_path, ["resnet18", "raddino_xgb"])
    before = pd.read_csv(tmp_path / "metrics.csv")
    assert before["ci_low"].isna().all()
    stats_stage.run(tmp_path, _cfg())
    after = pd.read_csv(tmp_path / "metrics.csv")
    kept = after[~after["metric"].isin(CALIBRATION_METRICS)]
    assert len(kept) == len(before)
    np.testing.assert_allclose(kept["value"], before["value"])  # point estimates untouched
    defined = kept[kept["value"].notna()]
    assert defined["ci_low"].notna().all() and (defined["ci_low"] <= defined["value"] + 1e-12).all()
    assert (defined["ci_high"] >= defined["value"] - 1e-12).all()
    calib = after[after["metric"].isin(CALIBRATION_METRICS)]
    assert len(calib) == 2 * 2 * 2 * 2  # arms x tasks x splits x metrics
    assert calib["ci_low"].notna().all()
    comp = pd.read_csv(tmp_path / "comparisons.csv")
    assert set(comp["metric"]) == {"auc", "accuracy", "balanced_accuracy", "kappa_quadratic"}
    assert (comp.loc[(comp["task"] == "osteophytes") & (comp["metric"] == "auc"), "method"] == "DeLong").all()
    assert (comp["p_holm"] >= comp["p_value"] - 1e-12).all()
    assert (comp["n_images"] == 40).all() and (comp["n_patients"] == 20).all()
    assert {"fpr", "tpr_low"} <= set(pd.read_csv(tmp_path / "roc_bands.csv").columns)
    rel = pd.read_csv(tmp_path / "reliability.csv")
    assert (rel.groupby(["arm", "task", "split"])["n"].sum() == 40).all()
    # re-running is deterministic and does not duplicate the calibration rows
    stats_stage.run(tmp_path, _cfg())
    again = pd.read_csv(tmp_path / "metrics.csv")
    pd.testing.assert_frame_equal(again, after)


def test_evaluate_after_stats_keeps_every_interval(tmp_path):
    """Issue: `kneeoa stats` then `kneeoa evaluate` emptied the CIs (17 of 18 filled before, 6 after)."""
    make_run(tmp_path, ["resnet18", "raddino_xgb"])
    stats_stage.run(tmp_path, _cfg(50))
    with_ci = pd.read_csv(tmp_path / "metrics.csv")
    assert with_ci["ci_low"].notna().sum() > 0
    get_stage("evaluate")(tmp_path, Config())
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "metrics.csv"), with_ci)


def test_an_interval_of_other_predictions_is_not_shown(tmp_path):
    """New predictions after `stats`: the merged view drops the stale CI instead of showing it beside a new value."""
    make_run(tmp_path, ["resnet18"], tasks=("osteophytes",))
    stats_stage.run(tmp_path, _cfg(50))
    table = read_predictions(tmp_path / "predictions" / "resnet18__osteophytes.parquet")[2]
    flipped = table.assign(prob_0=table["prob_1"], prob_1=table["prob_0"])
    write_predictions(flipped.drop(columns="y_pred"), tmp_path, "resnet18", "osteophytes")
    get_stage("evaluate")(tmp_path, Config())
    m = pd.read_csv(tmp_path / "metrics.csv").set_index(["split", "metric"])
    assert np.isnan(m.loc[("test", "auc"), "ci_low"])
    assert m.loc[("test", "ece"), "ci_low"] >= 0  # a row only stats owns keeps its interval


def test_stats_stage_one_arm_writes_empty_comparisons(tmp_path):
    make_run(tmp_path, ["resnet18"], tasks=("osteophytes",))
    stats_stage.run(tmp_path, _cfg(50))
    comp = pd.read_csv(tmp_path / "comparisons.csv")
    assert len(comp) == 0 and list(comp.columns) == columns("comparisons.csv")


def test_stats_stage_without_predictions_names_the_commands(tmp_path):
    make_run(tmp_path, ["resnet18"], tasks=("osteophytes",))
    for path in (tmp_path / "predictions").glob("*"):
        path.unlink()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(MissingInputError, match="kneeoa train .*kneeoa boost .*kneeoa zeroshot"):
        get_stage("stats")(tmp_path, _cfg(10))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_stats_stage_unknown_image_is_named(tmp_path):
    manifest = make_run(tmp_path, ["resnet18"], tasks=("osteophytes",))
    manifest = manifest.iloc[1:]
    write_manifest(manifest, tmp_path)
    with pytest.raises(ManifestError, match="P000_R.*not in the manifest"):
        stats_stage.run(tmp_path, _cfg(10))


def test_a_broken_metrics_part_is_named(tmp_path):
    make_run(tmp_path, ["resnet18"], tasks=("osteophytes",))
    pd.DataFrame({"arm": ["x"], "value": [1.0]}).to_csv(tmp_path / "metrics" / "evaluate.csv", index=False)
    with pytest.raises(ManifestError, match=r"metrics/evaluate.csv: missing column"):
        stats_stage.run(tmp_path, _cfg(10))


@pytest.mark.slow
def test_stats_stage_speed_1000_resamples(tmp_path):
    """1000 resamples x 4 arms x 2 tasks x 2 splits (~300 images per split) in under 30 s on one core."""
    make_run(tmp_path, ["a", "b", "c", "d"], n_patients=300)
    start = time.perf_counter()
    stats_stage.run(tmp_path, _cfg(1000))
    assert time.perf_counter() - start < 30
