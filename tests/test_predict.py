"""`kneeoa predict`: a package grades crops exactly as its run did, grades both knees of films, reports bad files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from deploy_fixtures import crop_list
from kneeoa.cli.app import app
from kneeoa.deploy.inputs import FileFacts, collect_inputs, detect_kind
from kneeoa.deploy.package import load_model
from kneeoa.deploy.predict import predict_files
from kneeoa.errors import ConfigError
from kneeoa.runfolder.predictions import prediction_path

pytest_plugins = ["deploy_fixtures"]


@pytest.fixture(scope="module")
def model(cnn_package):
    return load_model(cnn_package)


def test_predict_on_the_runs_test_crops_reproduces_its_prediction_tables(model, deploy_run, tmp_path):
    listing = crop_list(deploy_run, tmp_path / "test.csv")
    table = predict_files(model, collect_inputs([listing]), tmp_path / "out", progress=False)
    ids = pd.read_csv(listing)["image_id"].to_numpy()
    assert len(table) == len(ids) and table["error"].fillna("").eq("").all()
    for task, entry in model.info["tasks"].items():
        run = pd.read_parquet(prediction_path(deploy_run, "resnet18", task)).set_index("image_id").loc[ids]
        k = len(entry["classes"])
        ours = table[[f"{task}_p{j}" for j in range(k)]].to_numpy()
        assert np.abs(ours - run[[f"prob_{j}" for j in range(k)]].to_numpy()).max() <= 1e-5, task
        expected = run["y_pred"] if "y_pred" in run else run[[f"prob_{j}" for j in range(k)]].to_numpy().argmax(1)
        assert (table[task].to_numpy() == np.asarray(expected)).all(), task
    written = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert list(written.columns[:4]) == ["file", "side", "klg", "klg_p0"]
    assert np.allclose(written["klg_p0"], table["klg_p0"], atol=1e-12, rtol=0)


def test_phantom_films_get_both_knees_graded(model, phantom_films, tmp_path):
    table = predict_files(model, collect_inputs(phantom_films), tmp_path / "out", cam=True, progress=False)
    assert len(table) == 2 * len(phantom_films)
    assert table["error"].fillna("").eq("").all(), table["error"].tolist()
    for film in phantom_films:
        rows = table[table["file"] == str(film)]
        assert sorted(rows["side"]) == ["L", "R"] and (rows["kind"] == "bilateral").all()
        assert rows["klg"].between(0, 4).all() and np.isfinite(rows["localizer_confidence"]).all()
        probs = rows[[f"klg_p{k}" for k in range(5)]].to_numpy()
        assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    cams = [p for cell in table["cam"] for p in cell.split(";")]
    assert len(cams) == 2 * len(phantom_films) * 4
    assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in cams)


def test_bad_files_are_reported_and_the_rest_go_on(model, phantom_films, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    dicom = tmp_path / "broken.dcm"
    dicom.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 10)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(phantom_films[1].read_bytes()[:5000])
    table = predict_files(model, collect_inputs([tmp_path / "missing.dcm", text, dicom, cut, phantom_films[0]]),
                          tmp_path / "out", progress=False)
    errors = dict(zip(table["file"], table["error"].fillna(""), strict=True))
    assert "does not exist" in errors[str(tmp_path / "missing.dcm")]
    assert "expected DICOM, PNG or JPEG" in errors[str(text)]
    assert "DICOM but holds no image" in errors[str(dicom)]
    assert "DICOM" in errors[str(cut)] or "pixel data" in errors[str(cut)]
    assert (table.loc[table["file"] == str(phantom_films[0]), "error"].fillna("") == "").sum() == 2


def test_cli_on_a_folder(cnn_package, deploy_run, tmp_path):
    res = CliRunner().invoke(app, ["predict", str(deploy_run / "crops"), "--model", str(cnn_package),
                                   "--out", str(tmp_path), "--side", "R"])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "predictions.csv")
    assert len(table) == len(list((deploy_run / "crops").glob("*.png"))) and (table["kind"] == "crop").all()
    assert (table["side"] == "R").all() and table["qc_flags"].isna().all()


def test_crop_without_a_side_is_flagged(model, deploy_run, tmp_path):
    crop = next((deploy_run / "crops").glob("*.png"))
    table = predict_files(model, collect_inputs([crop]), tmp_path, progress=False)
    assert table["side"].tolist() == ["R"] and table["qc_flags"].tolist() == ["side_assumed"]


def test_csv_list_errors_name_the_file_and_row(tmp_path):
    bad = tmp_path / "list.csv"
    bad.write_text("path\nx.png\n")
    with pytest.raises(ConfigError, match="needs a 'file' column"):
        collect_inputs([bad])
    bad.write_text("file,side\nx.png,right\n")
    with pytest.raises(ConfigError, match="list.csv row 2: side is 'right'"):
        collect_inputs([bad])
    with pytest.raises(ConfigError, match="--kind is 'both'"):
        collect_inputs([tmp_path], kind="both")


@pytest.mark.parametrize(("facts", "kind"), [
    (FileFacts(False, None, None), "crop"),
    (FileFacts(True, 400.0, None), "bilateral"),
    (FileFacts(True, 200.0, "B"), "bilateral"),
    (FileFacts(True, 140.0, "R"), "crop"),
    (FileFacts(True, None, None), "crop"),
    (FileFacts(True, 220.0, "L"), "single"),
])
def test_detect_kind(facts, kind):
    assert detect_kind(facts) == kind
