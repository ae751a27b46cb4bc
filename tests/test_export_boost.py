"""`kneeoa export` of an `<encoder>_xgb` arm: the saved boost heads, packaged, grade the run's crops as it did."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import make_tiny_run
from deploy_fixtures import crop_list
from kneeoa.config import Config, dump_config
from kneeoa.deploy.inputs import collect_inputs
from kneeoa.deploy.package import PackageError, export_arm, load_model, read_info
from kneeoa.deploy.predict import predict_files
from kneeoa.models.estimators import XGBHead
from kneeoa.runfolder.heads import head_path
from kneeoa.runfolder.predictions import prediction_path
from kneeoa.sources.manifest import read_manifest, write_manifest
from kneeoa.stages import boost, embed

ARM = "raddino_xgb"
TASKS = ("klg", "osteophytes", "jsn", "sclerosis")


@pytest.fixture(scope="module")
def boosted_run(tmp_path_factory, standin_snapshots):
    """A tiny run through the real embed and boost stages (RAD-DINO stand-in, XGBoost heads only)."""
    run = tmp_path_factory.mktemp("boost_export") / "run"
    make_tiny_run(run, size=64, seed=1)  # the smallest crop the knee check's pixel rules let a grader see
    manifest = read_manifest(run)
    manifest["mirrored"] = manifest["side"] == "L"  # as importers write with data.mirror_left: the package must flip
    write_manifest(manifest, run)
    cfg = Config(name="boost-export-test")
    cfg.data.image_size = 64  # the tiny run's crop size, so `predict` re-crops a crop to itself
    fc = cfg.foundation
    fc.encoders, fc.weights, fc.linear_probe = ["rad-dino"], {"rad-dino": str(standin_snapshots["rad-dino"])}, False
    fc.precision, fc.batch_size, fc.n_jobs = "fp32", 8, 1
    fc.xgb_grid = {"max_depth": [2, 3], "learning_rate": [0.3]}
    fc.xgb_n_estimators, fc.xgb_early_stopping = 20, 5
    (run / "config.yaml").write_text(dump_config(cfg))
    embed.run(run, cfg)
    boost.run(run, cfg)
    return run


@pytest.fixture(scope="module")
def boost_package(boosted_run, tmp_path_factory):
    return export_arm(boosted_run, ARM, tmp_path_factory.mktemp("pkg") / "model")


def test_package_grades_the_runs_test_crops_as_the_run_did(boost_package, boosted_run, tmp_path):
    info = read_info(boost_package)
    assert info["kind"] == "embed_xgb" and set(info["tasks"]) == set(TASKS)
    assert info["preprocess"]["mirror_left"] is True
    assert all(d <= 1e-5 for d in info["export_check"]["max_abs_prob_difference"].values())
    listing = crop_list(boosted_run, tmp_path / "test.csv")
    ids = pd.read_csv(listing)["image_id"].to_numpy()
    assert len(ids) and {"R", "L"} <= set(pd.read_csv(listing)["side"])
    table = predict_files(load_model(boost_package), collect_inputs([listing]), tmp_path / "out", progress=False)
    assert len(table) == len(ids) and table["error"].fillna("").eq("").all(), table["error"].tolist()
    for task in TASKS:
        run = pd.read_parquet(prediction_path(boosted_run, ARM, task)).set_index("image_id").loc[ids]
        k = len(info["tasks"][task]["classes"])
        expected = run[[f"prob_{j}" for j in range(k)]].to_numpy()
        np.testing.assert_allclose(table[[f"{task}_p{j}" for j in range(k)]].to_numpy(), expected, rtol=0, atol=1e-5,
                                   err_msg=task)
        assert (table[task].to_numpy() == expected.argmax(axis=1)).all(), task


def test_package_missing_a_booster_names_the_file(boost_package, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(boost_package, broken)
    (broken / "weights" / "jsn.json").unlink()
    with pytest.raises(PackageError, match=r"lacks weights/jsn\.json \(listed in checksums\.json\)"):
        load_model(broken)
    (broken / "checksums.json").unlink()  # as packages exported before checksums were written
    with pytest.raises(PackageError, match=r"lacks .*weights/jsn\.json \(task 'jsn' in model\.json\)"):
        load_model(broken)


def test_run_without_saved_heads_is_refused_with_the_fix(boosted_run, tmp_path):
    saved = head_path(boosted_run, ARM, "klg")
    hidden = saved.with_name("hidden.json")
    saved.rename(hidden)
    try:
        with pytest.raises(PackageError, match=r"heads/raddino_xgb/klg\.json is missing.*Re-run `kneeoa boost "):
            export_arm(boosted_run, ARM, tmp_path / "m")
    finally:
        hidden.rename(saved)
    assert not (tmp_path / "m").exists()


def test_head_that_does_not_reproduce_the_run_is_refused(boosted_run, tmp_path):
    saved = head_path(boosted_run, ARM, "sclerosis")
    original = saved.read_bytes()
    shutil.copyfile(head_path(boosted_run, ARM, "osteophytes"), saved)  # another binary task's trees
    try:
        with pytest.raises(PackageError, match=r"sclerosis\.json does not reproduce .*Re-run `kneeoa boost "):
            export_arm(boosted_run, ARM, tmp_path / "m")
    finally:
        saved.write_bytes(original)


def test_xgb_head_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(90, 5)), rng.integers(0, 3, 90)  # labels are noise: val stops it after a few trees
    head = XGBHead(n_classes=5, n_estimators=40, early_stopping_rounds=3, n_jobs=1)
    head.fit(X[:60], y[:60], eval_set=(X[60:], y[60:]))
    loaded = XGBHead.load(head.save(tmp_path / "heads" / "klg.json"))
    assert loaded.get_params() == head.get_params() and list(loaded.classes_) == [0, 1, 2, 3, 4]
    assert loaded.best_iteration_ == head.best_iteration_ < loaded.booster_.num_boosted_rounds() - 1
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    head.booster_.save_model(str(tmp_path / "plain.json"))
    with pytest.raises(ValueError, match="plain.json is an XGBoost model without the 'kneeoa_xgb_head' attribute"):
        XGBHead.load(tmp_path / "plain.json")
