"""`kneeoa export`: a self-contained model package from a run's arm, and every way it refuses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from kneeoa.cli.app import app
from kneeoa.deploy.package import FORMAT, PackageError, export_arm, load_model, read_info
from kneeoa.errors import ConfigError
from kneeoa.formats.images import save_gray16

pytest_plugins = ["deploy_fixtures"]


def test_package_holds_weights_preprocessing_decoding_metrics_and_card(cnn_package):
    from safetensors.torch import load_file

    info = read_info(cnn_package)
    assert info["format"] == FORMAT and info["kind"] == "cnn" and info["arm"] == "resnet18"
    assert set(info["tasks"]) == {"klg", "osteophytes", "jsn", "sclerosis"}
    assert info["tasks"]["klg"]["classes"] == ["KL0", "KL1", "KL2", "KL3", "KL4"]
    assert all("method" in e["decoding"] for e in info["tasks"].values())
    assert {"image_size", "mean", "std"} <= set(info["preprocess"])
    assert {"name", "crop_mm", "crop_px"} <= set(info["localizer"])
    assert info["kneeoa_version"] and info["members"]
    for member in info["members"]:
        assert load_file(str(cnn_package / "weights" / f"{member}.safetensors"))
        assert "state_dict" not in json.loads((cnn_package / "weights" / f"{member}.json").read_text())
    metrics = pd.read_csv(cnn_package / "metrics.csv")
    assert set(metrics["split"]) == {"val", "test"} and (metrics["arm"] == "resnet18").all()
    assert metrics.loc[metrics["metric"] == "auc", "ci_low"].notna().any()
    assert json.loads((cnn_package / "data_summary.json").read_text())
    card = (cnn_package / "README.md").read_text()
    for heading in ("## Intended use", "## Training data", "## Metrics", "## Limits"):
        assert heading in card
    assert "Not a medical device" in card and "kappa_quadratic" in card


def test_package_loads_without_the_run(cnn_package, deploy_run, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(cnn_package, moved)
    hidden = deploy_run.with_name("hidden")
    deploy_run.rename(hidden)
    try:
        model = load_model(moved)
    finally:
        hidden.rename(deploy_run)
    assert set(model.info["tasks"]) == {"klg", "osteophytes", "jsn", "sclerosis"}


def test_export_cli(deploy_run, tmp_path):
    out = tmp_path / "m"
    res = CliRunner().invoke(app, ["export", str(deploy_run), "--arm", "resnet18", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "model.json").exists() and not list(tmp_path.glob(".*partial"))
    res = CliRunner().invoke(app, ["export", str(deploy_run), "--arm", "resnet18", "--out", str(out)])
    assert res.exit_code == 2 and "already exists" in res.output


def test_unknown_arm_names_the_arms_of_the_run(deploy_run, tmp_path):
    with pytest.raises(ConfigError, match="no arm 'resnet81'.*resnet18"):
        export_arm(deploy_run, "resnet81", tmp_path / "m")


def test_arm_that_did_not_run_is_refused(deploy_run, tmp_path):
    from kneeoa.runfolder.arms import record_arm

    record_arm(deploy_run, "raddino_xgb", status="not_run", reason="weights not found")
    try:
        with pytest.raises(ConfigError, match="did not run \\(weights not found\\)"):
            export_arm(deploy_run, "raddino_xgb", tmp_path / "m")
    finally:
        (deploy_run / "arms" / "raddino_xgb.json").unlink()


def test_folder_that_is_not_a_package(tmp_path):
    with pytest.raises(ConfigError, match="not a kneeoa model package"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text('{"format": "other/9"}')
    with pytest.raises(ConfigError, match="format 'other/9'"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(tmp_path)


def test_package_missing_its_weights(cnn_package, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(cnn_package, broken)
    (broken / "weights" / "member0.safetensors").unlink()
    with pytest.raises(PackageError, match="member0.safetensors"):
        load_model(broken)


def test_export_fits_a_knee_check_that_refuses_what_the_run_never_saw(deploy_run, tmp_path):
    from kneeoa.deploy.inputs import collect_inputs
    from kneeoa.deploy.predict import predict_files

    out = export_arm(deploy_run, "resnet18", tmp_path / "m", knee_check_alpha=0.5)
    info = read_info(out)
    assert info["knee_check"]["method"] == "layout_features" and (out / "knee_check.safetensors").exists()
    assert "knee_score` below 0.25 is not graded" in (out / "README.md").read_text()
    model = load_model(out)
    yy, xx = np.mgrid[0:64, 0:64] / 64
    strange = {"gradient": xx * 0.8 + 0.1, "stripes": 0.5 + 0.4 * np.sign(np.sin(yy * 40))}
    for name, img in strange.items():
        save_gray16(img, tmp_path / f"{name}.png")
    table = predict_files(model, collect_inputs([tmp_path / "gradient.png", tmp_path / "stripes.png"], side="R"),
                          tmp_path / "p", progress=False)
    assert table["error"].str.contains("knee check").all() and table["klg"].isna().all()
    assert (table["knee_score"] < 0.25).all()
    crops = sorted((deploy_run / "crops").glob("*.png"))
    own = predict_files(model, collect_inputs(crops, side="R"), tmp_path / "q", progress=False)
    assert own["error"].fillna("").eq("").mean() >= 0.5 and own["knee_score"].between(0, 1).all()


def test_a_run_too_small_to_calibrate_gets_no_fitted_check_and_says_so(cnn_package):
    entry = read_info(cnn_package)["knee_check"]
    assert entry["method"] == "none" and "too few" in entry["reason"]
    assert load_model(cnn_package).knee_check is None
    assert "No fitted knee check" in (cnn_package / "README.md").read_text()
