"""Stage `fusion`: the cross-fitted stacker (test rows never reach a fit), feature fusion of a CNN and an embedding
arm, the named errors, and the report's fusion section."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import make_tiny_run
from kneeoa.config import Config
from kneeoa.errors import ConfigError, DataError, ManifestError
from kneeoa.models.stacking import Decoding, Stacker, cross_fit, fit_stacker, patient_folds, stack_inputs
from kneeoa.runfolder.arms import read_arms, record_arm
from kneeoa.runfolder.fusion import read_fusion_record
from kneeoa.runfolder.predictions import make_prediction_table, prediction_path, read_predictions, write_predictions
from kneeoa.stages import fusion
from kneeoa.tasks import get_task

TASKS = ("klg", "osteophytes")


def _member_probs(y: np.ndarray, k: int, skill: float, rng: np.random.Generator) -> np.ndarray:
    """Probabilities that lean towards the true class by `skill` (0: noise)."""
    logits = rng.normal(0, 1, (len(y), k))
    logits[np.arange(len(y)), y] += skill
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def _write_member(run, manifest: pd.DataFrame, arm: str, skill: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for task in TASKS:
        y = manifest[task].to_numpy(dtype=int)
        probs = _member_probs(y, get_task(task).n_classes, skill, rng)
        write_predictions(make_prediction_table(manifest["image_id"], manifest["split"], y, probs), run, arm, task)
    record_arm(run, arm, status="ran", weights="test")


@pytest.fixture
def two_members(tmp_path):
    """A run with 40 patients and two made-up member arms with prediction tables for klg and osteophytes."""
    run = tmp_path / "run"
    manifest = make_tiny_run(run, patients=40, size=16)
    _write_member(run, manifest, "cnn_a", skill=2.0, seed=1)
    _write_member(run, manifest, "emb_b", skill=1.0, seed=2)
    cfg = Config()
    cfg.tasks.names = list(TASKS)
    cfg.fusion.arms, cfg.fusion.methods, cfg.fusion.folds = ["cnn_a", "emb_b"], ["stack"], 3
    return run, manifest, cfg


def _stack_table(run, task: str) -> pd.DataFrame:
    return read_predictions(prediction_path(run, fusion.STACK_ARM, task))[2]


# ------------------------------------------------------------------------------------------------------ stacker


def test_stack_inputs_are_clipped_log_probabilities():
    x = stack_inputs([np.array([[1.0, 0.0]]), np.array([[0.25, 0.75]])])
    assert x.shape == (1, 4)
    np.testing.assert_allclose(x, np.log([[1.0, 1e-6, 0.25, 0.75]]))


def test_stacker_round_trips_and_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    X = stack_inputs([_member_probs(y, 3, 1.5, rng)])
    stacker = fit_stacker(X, y, np.arange(200), 3, c=0.5, decoding=Decoding())
    ref = LogisticRegression(C=0.5, max_iter=5000).fit(X, y).predict_proba(X)
    np.testing.assert_allclose(stacker.predict_proba(X), ref, atol=1e-6)
    again = Stacker.from_dict(json.loads(json.dumps(stacker.to_dict())))
    np.testing.assert_array_equal(again.predict_proba(X), stacker.predict_proba(X))


def test_binary_stacker_and_a_fold_with_one_class():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 100)
    X = stack_inputs([_member_probs(y, 2, 2.0, rng)])
    p = fit_stacker(X, y, np.arange(100), 2, c=1.0, decoding=Decoding()).predict_proba(X)
    assert p.shape == (100, 2) and np.allclose(p.sum(axis=1), 1)
    assert (p.argmax(axis=1) == y).mean() > 0.7
    lone = fit_stacker(X[y == 1], y[y == 1], np.arange((y == 1).sum()), 5, c=1.0, decoding=Decoding())
    np.testing.assert_array_equal(lone.predict_proba(X[:3]), np.tile([0, 1, 0, 0, 0], (3, 1)))


def test_patient_folds_keep_a_patients_knees_together_and_need_enough_patients():
    groups = np.repeat(np.arange(20), 2)
    y = np.tile([0, 1], 20)
    folds = patient_folds(y, groups, 4, seed=0)
    assert set(folds) == {0, 1, 2, 3}
    assert all(len(set(folds[groups == g])) == 1 for g in range(20))
    with pytest.raises(DataError, match="at least 5 val patients; val has 2"):
        patient_folds(y[:4], groups[:4], 5, seed=0)


def test_cross_fitted_predictions_come_from_stackers_that_never_saw_the_row():
    """A row's out-of-fold prediction must not change when that row's own inputs are the only thing that moves in
    the other folds' data (here: when its fold's rows are relabelled, the others' predictions stay put)."""
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(30), 2)
    y = rng.integers(0, 3, 60)
    X = stack_inputs([_member_probs(y, 3, 1.5, rng)])
    folds = patient_folds(y, groups, 3, seed=0)
    p1, _ = cross_fit(X, y, groups, folds, 3, c=1.0, decoding=Decoding())
    y2 = y.copy()
    y2[folds == 0] = (y2[folds == 0] + 1) % 3
    p2, _ = cross_fit(X, y2, groups, folds, 3, c=1.0, decoding=Decoding())
    np.testing.assert_allclose(p1[folds == 0], p2[folds == 0])  # fold 0 is predicted without its own labels
    assert not np.allclose(p1[folds == 1], p2[folds == 1])  # the others were fitted with them


def test_cutpoint_decoding_is_tuned_for_ordinal_tasks():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 300)
    X = stack_inputs([_member_probs(y, 5, 1.0, rng)])
    stacker = fit_stacker(X, y, np.arange(300), 5, c=1.0, decoding=Decoding(cutpoints=True))
    assert stacker.decoding["method"] == "cutpoints" and len(stacker.decoding["cuts"]) == 4


# --------------------------------------------------------------------------------------------------------- stage


def test_stack_writes_val_and_test_rows_in_the_contract_and_beats_chance(two_members):
    run, manifest, cfg = two_members
    fusion.run(run, cfg)
    for task in TASKS:
        table = _stack_table(run, task)
        assert set(table["split"]) == {"val", "test"}
        expected = manifest[manifest["split"].isin(["val", "test"])]["image_id"]
        assert set(table["image_id"]) == set(expected)
        record = read_fusion_record(run, fusion.STACK_ARM, task)
        assert record["members"] == ["cnn_a", "emb_b"]
        val_ids = set(manifest.loc[manifest["split"] == "val", "image_id"])
        assert set(record["val_folds"]) == val_ids and set(record["val_folds"].values()) == {0, 1, 2}
    klg = _stack_table(run, "klg")
    assert (klg["y_pred"] == klg["y_true"]).mean() > 0.4  # chance is 0.2; the members carry signal
    rec = read_arms(run)[fusion.STACK_ARM]
    assert rec["status"] == "ran" and rec["details"]["members"] == ["cnn_a", "emb_b"]


def test_test_rows_never_reach_the_stackers_fit(two_members):
    """Scrambling every test row of every member changes the test predictions and nothing else: not one val
    prediction, not one coefficient of the stacker."""
    run, manifest, cfg = two_members
    fusion.run(run, cfg)
    before = {t: (_stack_table(run, t), read_fusion_record(run, fusion.STACK_ARM, t)) for t in TASKS}
    rng = np.random.default_rng(9)
    test = (manifest["split"] == "test").to_numpy()
    for task in TASKS:
        k = get_task(task).n_classes
        labels = rng.integers(0, k, int(test.sum()))  # new test labels, the same for both members
        for arm in ("cnn_a", "emb_b"):
            _, _, table = read_predictions(prediction_path(run, arm, task))
            table.loc[test, [f"prob_{c}" for c in range(k)]] = rng.dirichlet(np.ones(k), int(test.sum()))
            table.loc[test, "y_true"] = labels
            write_predictions(table, run, arm, task)
    fusion.run(run, cfg)
    for task in TASKS:
        old_table, old_record = before[task]
        new_table, new_record = _stack_table(run, task), read_fusion_record(run, fusion.STACK_ARM, task)
        val = old_table["split"] == "val"
        pd.testing.assert_frame_equal(new_table[val.to_numpy()], old_table[val])
        assert new_record["stacker"] == old_record["stacker"]
        assert not new_table[~val.to_numpy()].equals(old_table[~val])


def test_members_must_be_two_known_arms(two_members):
    run, _, cfg = two_members
    cfg.fusion.arms = ["cnn_a"]
    with pytest.raises(ConfigError, match="at least two. Arms of .*cnn_a, emb_b"):
        fusion.run(run, cfg)
    cfg.fusion.arms = ["cnn_a", "emb_c"]
    with pytest.raises(ConfigError, match="'emb_c' is not an arm of .*Did you mean 'emb_b'"):
        fusion.run(run, cfg)
    cfg.fusion.arms = ["cnn_a", "fusion_stack"]
    with pytest.raises(ConfigError, match="is a fused arm"):
        fusion.run(run, cfg)
    assert not prediction_path(run, fusion.STACK_ARM, "klg").exists()


def test_members_scored_on_other_knees_are_refused(two_members):
    run, _, cfg = two_members
    _, _, table = read_predictions(prediction_path(run, "emb_b", "klg"))
    dropped = table[table["split"] == "test"]["image_id"].iloc[0]
    write_predictions(table[table["image_id"] != dropped], run, "emb_b", "klg")
    with pytest.raises(ManifestError, match=f"cnn_a and emb_b were not run on the same knees for task klg: 1 .*"
                                            f"{dropped}"):
        fusion.run(run, cfg)


def test_a_member_that_did_not_run_makes_not_run_fused_arms(two_members):
    run, _, cfg = two_members
    cfg.fusion.methods = ["stack", "features"]
    record_arm(run, "emb_b", status="not_run", reason="no weights for emb")
    fusion.run(run, cfg)
    arms = read_arms(run)
    for arm in ("fusion_stack", "fusion_features_xgb", "fusion_features_linear"):
        assert arms[arm]["status"] == "not_run" and "emb_b: no weights for emb" in arms[arm]["reason"]
    assert not prediction_path(run, "fusion_stack", "klg").exists()


def test_a_member_without_a_task_table_skips_that_task(two_members):
    run, _, cfg = two_members
    prediction_path(run, "emb_b", "osteophytes").unlink()
    fusion.run(run, cfg)
    tasks = read_arms(run)[fusion.STACK_ARM]["details"]["tasks"]
    assert "emb_b" in tasks["osteophytes"]["skipped"] and tasks["klg"]["val_images"] > 0
    assert not prediction_path(run, fusion.STACK_ARM, "osteophytes").exists()


def test_feature_fusion_needs_two_feature_sources(two_members):
    run, _, cfg = two_members
    cfg.fusion.methods = ["features"]
    fusion.run(run, cfg)
    rec = read_arms(run)["fusion_features_xgb"]
    assert rec["status"] == "not_run" and "give 0" in rec["reason"]


# ------------------------------------------------------------------------------- a whole toy study (stand-ins)


def test_a_phantom_study_writes_both_fusions_for_every_task_and_reports_them(finished_run):
    run, cfg = finished_run
    tasks = ["klg", "osteophytes", "jsn", "sclerosis"]
    for arm in ("fusion_stack", "fusion_features_xgb", "fusion_features_linear"):
        for task in tasks:
            _, got_task, table = read_predictions(prediction_path(run, arm, task))
            assert got_task == task and len(table)
    features = read_arms(run)["fusion_features_xgb"]["details"]
    assert [s["kind"] for s in features["sources"]] == ["cnn", "encoder"]
    assert features["dim"] == 512 + features["sources"][1]["dim"]  # ResNet18 pooled features + the embedding
    assert read_fusion_record(run, "fusion_stack", "klg")["members"] == ["resnet18", "raddino_xgb"]
    comparisons = pd.read_csv(run / "comparisons.csv")
    assert ((comparisons["arm_a"] == "fusion_stack") | (comparisons["arm_b"] == "fusion_stack")).any()
    report = (run / "report.html").read_text()
    assert "Hybrid arms (fusion)" in report and "fusion_features_xgb" in report


def test_the_fusion_command_exits_2_without_members_and_runs_with_a_config(two_members, tmp_path):
    from typer.testing import CliRunner

    from kneeoa.cli import app
    from kneeoa.config import dump_config

    run, _, cfg = two_members
    runner = CliRunner()
    res = runner.invoke(app, ["fusion", str(run)])
    assert res.exit_code == 2 and "fusion.arms names 0 arm(s)" in res.output
    assert not prediction_path(run, fusion.STACK_ARM, "klg").exists()
    study = tmp_path / "study.yaml"
    study.write_text(dump_config(cfg))
    res = runner.invoke(app, ["fusion", str(run), "-c", str(study)])
    assert res.exit_code == 0, res.output
    assert "fusion_stack: ran (klg, osteophytes)" in res.output
    assert {"klg", "osteophytes"} == {t for t in TASKS if prediction_path(run, fusion.STACK_ARM, t).exists()}
    record_arm(run, "emb_b", status="not_run", reason="no weights for emb")
    res = runner.invoke(app, ["fusion", str(run), "-c", str(study)])
    assert res.exit_code == 1 and "fusion_stack: not run (member arm(s) did not run (emb_b: no weights" in res.output


def test_the_explain_command_exits_1_when_it_draws_no_map(two_members, tmp_path):
    """Arms no map can explain (no checkpoint, no encoder, no kept model): every arm skipped, exit 1, and why."""
    from typer.testing import CliRunner

    from kneeoa.cli import app
    from kneeoa.config import dump_config

    run, _, cfg = two_members
    study = tmp_path / "study.yaml"
    study.write_text(dump_config(cfg))
    res = CliRunner().invoke(app, ["explain", str(run), "-c", str(study)])
    assert res.exit_code == 1, res.output
    assert "Grad-CAM: 0 montage(s), 1 skipped" in res.output and "occlusion map: 0 montage(s), 4 skipped" in res.output


def test_the_fused_arms_are_re_run_on_crops_and_get_occlusion_maps(finished_run):
    """Explanations for every arm: the fused arms are rebuilt from their kept models (the stacker over its re-run
    members; the features of each source into the kept head) and reproduce their own test tables on the unoccluded
    crops; the explain stage draws their occlusion maps."""
    from kneeoa.arms.predictors import arm_predictor
    from kneeoa.runfolder.manifest import load_knee, read_manifest
    from kneeoa.runfolder.montages import OCCLUSION

    run, cfg = finished_run
    manifest = read_manifest(run).set_index("image_id")
    for arm in ("fusion_stack", "fusion_features_linear"):
        _, _, table = read_predictions(prediction_path(run, arm, "osteophytes"))
        test = table[table["split"] == "test"].head(6)
        crops = [load_knee(run, manifest.loc[i].to_dict()) for i in test["image_id"]]
        got = arm_predictor(run, arm, "osteophytes", cfg)(crops)
        np.testing.assert_allclose(got, test[["prob_0", "prob_1"]].to_numpy(), atol=1e-4)
    drawn = {m["arm"] for m in OCCLUSION.read_index(run)["montages"]}
    assert {"fusion_stack", "fusion_features_xgb", "fusion_features_linear"} <= drawn


def test_gradcam_leaves_the_feature_fusion_linear_arm_to_occlusion(finished_run):
    from kneeoa.arms.encoder_cam import probe_arms

    run, _ = finished_run
    assert "fusion_features_linear" not in probe_arms(run)
