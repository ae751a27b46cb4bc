"""Stage `boost` and the XGBoost head: val-only selection, all splits predicted, arms recorded."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from kneeoa.config import Config, FoundationCfg
from kneeoa.errors import ConfigError
from kneeoa.models import probes
from kneeoa.models.estimators import XGBHead
from kneeoa.runfolder.arms import read_arms
from kneeoa.runfolder.heads import keep_fits
from kneeoa.runfolder.predictions import prediction_path, read_predictions
from kneeoa.sources.manifest import read_manifest, write_manifest
from kneeoa.stages import boost, embed


def _cfg(standin_snapshots) -> Config:
    cfg = Config()
    fc = cfg.foundation
    fc.weights = {k: str(v) for k, v in standin_snapshots.items()}
    fc.precision, fc.batch_size = "fp32", 8
    fc.xgb_grid = {"max_depth": [2, 3], "learning_rate": [0.3]}
    fc.xgb_n_estimators, fc.xgb_early_stopping = 20, 5
    fc.linear_c_grid = [0.1, 1.0]
    fc.n_jobs = 1  # XGBoost threads spin badly on a shared two-core machine
    return cfg


@pytest.fixture
def embedded_run(tiny_run, standin_snapshots):
    cfg = _cfg(standin_snapshots)
    embed.run(tiny_run, cfg)
    return tiny_run, cfg


def test_boost_writes_all_splits_and_records_chosen_params(embedded_run):
    run_dir, cfg = embedded_run
    boost.run(run_dir, cfg)
    manifest = read_manifest(run_dir)
    arms = read_arms(run_dir)
    for arm in ("biomedclip_xgb", "raddino_xgb", "biomedclip_linear", "raddino_linear"):
        assert arms[arm]["status"] == "ran" and "revision" in arms[arm]["weights"]
        for task in ("klg", "osteophytes", "jsn", "sclerosis"):
            _, _, table = read_predictions(prediction_path(run_dir, arm, task))
            assert set(table["split"]) == {"train", "val", "test"}
            assert len(table) == manifest[task].notna().sum()
            chosen = arms[arm]["details"]["tasks"][task]
            if arm.endswith("_xgb"):
                assert chosen["max_depth"] in (2, 3) and 1 <= chosen["n_trees"] <= 20
            else:
                assert chosen["C"] in (0.1, 1.0)
    _, _, klg = read_predictions(prediction_path(run_dir, "raddino_xgb", "klg"))
    assert klg.filter(like="prob_").shape[1] == 5


def test_test_labels_never_influence_the_choice(tiny_run, standin_snapshots):
    run_dir, cfg = tiny_run, _cfg(standin_snapshots)
    cfg.foundation.encoders, cfg.foundation.linear_probe, cfg.tasks.names = ["biomedclip"], False, ["klg"]
    embed.run(run_dir, cfg)
    boost.run(run_dir, cfg)
    before = read_arms(run_dir)["biomedclip_xgb"]["details"]
    _, _, probs_before = read_predictions(prediction_path(run_dir, "biomedclip_xgb", "klg"))
    manifest = read_manifest(run_dir)
    test = manifest["split"] == "test"
    manifest.loc[test, "klg"] = (manifest.loc[test, "klg"] + 2) % 5  # scramble the test labels only
    write_manifest(manifest, run_dir)
    boost.run(run_dir, cfg)
    assert read_arms(run_dir)["biomedclip_xgb"]["details"] == before
    _, _, probs_after = read_predictions(prediction_path(run_dir, "biomedclip_xgb", "klg"))
    np.testing.assert_allclose(probs_after.filter(like="prob_"), probs_before.filter(like="prob_"))


def test_missing_embeddings_are_recorded_not_run(tiny_run, standin_snapshots):
    cfg = _cfg(standin_snapshots)
    cfg.foundation.encoders = ["rad-dino"]
    boost.run(tiny_run, cfg)
    rec = read_arms(tiny_run)["raddino_xgb"]
    assert rec["status"] == "not_run" and "kneeoa embed" in rec["reason"]


def test_a_task_without_two_train_classes_is_skipped_and_nothing_is_kept(tmp_path):
    """`fit_arm` says why it could not fit a task; `keep_fits` then writes no head and no table for it."""
    rng = np.random.default_rng(0)
    split = ["train"] * 12 + ["val"] * 6
    manifest = pd.DataFrame({"image_id": [f"i{i}" for i in range(18)], "split": split,
                             "osteophytes": [1] * 12 + [0, 1] * 3, "jsn": [0, 1] * 9})
    X = rng.normal(size=(18, 4))
    cfg = Config()
    cfg.foundation.linear_c_grid = [1.0]
    fits = probes.fit_arm("linear", X, manifest, ["osteophytes", "jsn"], cfg)
    assert not fits["osteophytes"].fitted and fits["osteophytes"].chosen["skipped"].startswith(
        "needs two classes in train and labelled val images; train has classes [1], val has 6 image(s)")
    assert fits["jsn"].fitted and fits["jsn"].probs.shape == (18, 2)
    chosen = keep_fits("linear", fits, run_dir=tmp_path, arm="toy_linear",
                       keep=lambda task: tmp_path / "heads" / f"{task}.json")
    assert chosen == {task: fit.chosen for task, fit in fits.items()}
    assert sorted(p.name for p in (tmp_path / "heads").iterdir()) == ["jsn.json"]
    assert not prediction_path(tmp_path, "toy_linear", "osteophytes").exists()
    _, _, table = read_predictions(prediction_path(tmp_path, "toy_linear", "jsn"))
    assert list(table["image_id"]) == list(manifest["image_id"]) and list(table["y_true"]) == [0, 1] * 9


def test_bad_grid_key():
    with pytest.raises(ConfigError, match="Unknown key 'depth' in foundation.xgb_grid. Valid keys: max_depth"):
        probes.xgb_grid(FoundationCfg(xgb_grid={"depth": [3]}))


def test_xgb_head_contract():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 6))
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5)  # classes 0-2 only
    head = XGBHead(n_classes=5, n_estimators=30, early_stopping_rounds=5, n_jobs=1)
    assert head.fit(X[:80], y[:80], eval_set=(X[80:], y[80:])) is head
    p = head.predict_proba(X[80:])
    assert p.shape == (40, 5) and np.allclose(p.sum(axis=1), 1) and list(head.classes_) == [0, 1, 2, 3, 4]
    assert (head.predict(X[80:]) == y[80:]).mean() > 0.7
    assert clone(head).get_params() == head.get_params()
    np.testing.assert_allclose(pickle.loads(pickle.dumps(head)).predict_proba(X[:5]), head.predict_proba(X[:5]))
    with pytest.raises(ConfigError, match="'class_weight' parameter of XGBHead must be 'balanced' or None"):
        XGBHead(class_weight="inverse").fit(X, y)
    with pytest.raises(ValueError, match=r"labels must be 0\.\.1; got 0\.\.2"):
        XGBHead(n_classes=2).fit(X, y)


def test_end_to_end_embed_boost_zeroshot_evaluate_report(embedded_run):
    """The foundation arms flow through the lead's evaluation and report like any other arm."""
    import pandas as pd

    from kneeoa.report.html import build_report
    from kneeoa.stages import evaluate, zeroshot

    run_dir, cfg = embedded_run
    cfg.foundation.encoders, cfg.tasks.names = ["rad-dino"], ["klg", "jsn"]
    boost.run(run_dir, cfg)
    zeroshot.run(run_dir, cfg)
    evaluate.run(run_dir, cfg)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert {"raddino_xgb", "raddino_linear", "biomedclip_zeroshot"} <= set(metrics["arm"])
    assert "test" in set(metrics.loc[metrics["arm"] == "raddino_xgb", "split"])
    page = build_report(run_dir, cfg).read_text()
    assert "Zero-shot BiomedCLIP" in page and "Foundation-model embeddings" in page and "microsoft/rad-dino" in page
