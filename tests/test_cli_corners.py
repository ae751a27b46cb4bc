"""Corners a hostile user finds (issue 23's rows), each answered with a named error and the truthful exit code.

Each test is named after its row; the rows not yet answered are listed in that issue.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from kneeoa.cli.app import app
from kneeoa.config_checks import load_config
from kneeoa.deploy.inputs import collect_inputs
from kneeoa.deploy.package import PackageError, export_arm, load_model, read_info
from kneeoa.deploy.predict import predict_files
from kneeoa.errors import ConfigError, ManifestError

pytest_plugins = ["deploy_fixtures"]


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize(("text", "words"), [("- a\n", "holds a YAML list"), ("hello\n", "holds a YAML str"),
                                             ("", "is empty")])
def test_row_1_2_a_config_that_is_a_list_a_scalar_or_empty_is_refused(tmp_path, text, words):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(path)
    res = _cli("run", str(path), "--out", str(tmp_path / "run"))
    assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()


def test_row_3_run_prints_a_report_path_only_when_written(tmp_path):
    from conftest import make_tiny_run

    run = tmp_path / "run"
    make_tiny_run(run)
    study = tmp_path / "study.yaml"
    study.write_text("data: {source: manifest}\nstages: [prepare]\n")
    res = _cli("run", str(study), "--out", str(run))
    assert res.exit_code == 0, res.output
    assert "no report.html: the report stage did not run" in res.output and not (run / "report.html").exists()


def _huge_png(path):
    Image.frombytes("L", (20000, 20000), b"\0" * (20000 * 20000)).save(path, optimize=False)
    return path


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    return _huge_png(tmp_path_factory.mktemp("huge") / "huge.png")


def test_row_4_a_huge_png_beside_a_good_crop_is_reported_and_the_crop_still_graded(cnn_package, deploy_run,
                                                                                    huge_png, tmp_path):
    good = sorted((deploy_run / "crops").glob("*.png"))[0]
    table = predict_files(load_model(cnn_package), collect_inputs([huge_png, good], side="R"), tmp_path,
                          progress=False)
    errors = dict(zip(table["file"], table["error"].fillna(""), strict=True))
    assert "larger than 100 Mpx" in errors[str(huge_png)] and "KNEEOA_MAX_IMAGE_PIXELS" in errors[str(huge_png)]
    assert errors[str(good)] == ""


def test_row_5_serve_answers_a_huge_png_with_a_json_4xx(live_server, huge_png):
    import httpx

    answer = httpx.post(f"{live_server.url}/api/predict", files={"file": ("huge.png", huge_png.read_bytes())},
                        timeout=120)
    assert answer.status_code == 422 and "larger than 100 Mpx" in answer.json()["error"]


def test_row_6_a_package_corrupted_in_the_middle_is_refused_before_any_grade(cnn_package, tmp_path):
    broken = shutil.copytree(cnn_package, tmp_path / "m")
    weights = broken / "weights" / "member0.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
    weights.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="member0.safetensors changed since export"):
        load_model(broken)
    res = _cli("predict", str(tmp_path), "--model", str(broken), "--out", str(tmp_path / "p"))
    assert res.exit_code == 2 and "changed since export" in res.output and not (tmp_path / "p").exists()


def test_row_7_a_truncated_weights_file_is_a_named_error(cnn_package, tmp_path):
    broken = shutil.copytree(cnn_package, tmp_path / "m")
    (broken / "checksums.json").unlink()  # a package exported before checksums were written
    weights = broken / "weights" / "member0.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PackageError, match="member0.safetensors or member0.json cannot be read .*damaged or trunc"):
        load_model(broken)


def test_row_8_model_json_without_tasks_is_a_named_error(cnn_package, tmp_path):
    broken = shutil.copytree(cnn_package, tmp_path / "m")
    info = read_info(broken)
    del info["tasks"]
    (broken / "model.json").write_text(json.dumps(info))
    with pytest.raises(PackageError, match="lacks 'tasks'"):
        read_info(broken)


def test_row_9_predict_that_graded_nothing_exits_non_zero(cnn_package, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not a png")
    res = _cli("predict", str(fake), str(tmp_path / "missing.dcm"), "--model", str(cnn_package), "--out",
               str(tmp_path / "p"))
    assert res.exit_code == 1 and "0 knee(s) graded, 2 file(s) or knee(s) not graded" in res.output


def test_row_10_localize_with_every_film_quarantined_exits_non_zero(tmp_path):
    text = tmp_path / "film.dcm"
    text.write_text("not a film")
    res = _cli("localize", str(text), "--out", str(tmp_path / "l"))
    assert res.exit_code == 1 and "0 knee(s) cropped" in res.output


def test_row_11_a_corrupt_or_empty_parquet_is_a_named_error(deploy_run, tmp_path):
    from kneeoa.sources.manifest import read_manifest

    run = shutil.copytree(deploy_run, tmp_path / "run")
    (run / "manifest.parquet").write_bytes(b"")
    with pytest.raises(ManifestError, match="cannot be read as a parquet table .*kneeoa prepare"):
        read_manifest(run)
    (run / "predictions" / "resnet18__klg.parquet").write_bytes(b"PAR1 truncated")
    res = _cli("evaluate", str(run))
    assert res.exit_code == 2 and "cannot be read as a parquet table" in res.output and "Traceback" not in res.output


def test_row_13_export_with_a_corrupt_arm_record_is_a_named_error(deploy_run, tmp_path):
    run = shutil.copytree(deploy_run, tmp_path / "run")
    (run / "arms" / "resnet18.json").write_text("{not json")
    with pytest.raises(ConfigError, match="resnet18.json is not valid JSON"):
        export_arm(run, "resnet18", tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("command", [["phantom", "--patients", "2"], ["predict", "x.png"], ["prepare", "csv", "t.csv"]])
def test_row_14_out_naming_an_existing_file_is_refused(tmp_path, command):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    res = _cli(*command, "--out", str(taken))
    assert res.exit_code == 2 and f"{taken} cannot be an output folder" in res.output
    assert taken.read_text() == "a file"


def test_row_20_serve_on_a_port_out_of_range_is_refused():
    res = _cli("serve", "--port", "70000")
    assert res.exit_code == 2 and "65535" in res.output and "Traceback" not in res.output


def test_row_21_models_list_with_a_missing_run_folder_says_so(tmp_path):
    res = _cli("models", "list", "--run", str(tmp_path / "nope"))
    assert res.exit_code == 2 and "is not a run folder (it does not exist)" in res.output


def test_row_22_pydicoms_jpeg_extended_file_is_refused_by_its_tags_with_no_decoder_noise(tmp_path, capfd):
    import pydicom

    from kneeoa.deploy.builtin import resolve_model
    from kneeoa.deploy.inputs import InputFile
    from kneeoa.deploy.package import load_model as load

    path = Path(pydicom.data.get_testdata_file("JPGExtended.dcm"))
    table = predict_files(load(resolve_model()), [InputFile(path)], tmp_path, progress=False)
    assert "Modality is 'NM'" in table["error"].iloc[0]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "gdcm" not in err.lower()


def test_non_finite_outputs_are_an_error_never_a_grade(cnn_package, deploy_run, tmp_path, monkeypatch):
    model = load_model(cnn_package)
    monkeypatch.setattr(model, "predict_proba", lambda crops, sides: {t: np.full((len(crops), len(e["classes"])),
                                                                                 np.nan)
                                                                      for t, e in model.info["tasks"].items()})
    with pytest.raises(PackageError, match="non-finite probabilities"):
        predict_files(model, collect_inputs(sorted((deploy_run / "crops").glob("*.png"))[:1], side="R"), tmp_path,
                      progress=False)


FLAG_CASES = [("prepare", "--crop-mm", "0", "data.crop_mm"), ("prepare", "--image-size", "0", "data.image_size"),
              ("prepare", "--default-spacing-mm", "-0.2", "data.default_spacing_mm"),
              ("prepare", "--workers", "-1", "data.workers"),
              ("localize", "--crop-mm", "0", "data.crop_mm"), ("localize", "--image-size", "0", "data.image_size"),
              ("localize", "--spacing-mm", "-0.2", "data.default_spacing_mm"),
              ("localize", "--spacing-mm", "0", "data.default_spacing_mm")]


@pytest.mark.parametrize(("command", "flag", "value", "key"), FLAG_CASES)
def test_row_15_16_17_prepare_and_localize_flags_pass_the_checks_their_config_keys_pass(tmp_path, command, flag,
                                                                                       value, key):
    source = tmp_path / ("t.csv" if command == "prepare" else "film.dcm")
    source.write_text("image_path,patient_id,side,klg\nx.png,p1,R,0\n")
    args = ["prepare", "csv", str(source)] if command == "prepare" else ["localize", str(source)]
    res = _cli(*args, "--out", str(tmp_path / "out"), flag, value)
    assert res.exit_code == 2 and key in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_phantom_flags_pass_the_checks_their_config_keys_pass(tmp_path):
    res = _cli("phantom", "--out", str(tmp_path / "p"), "--patients", "0", "--low-quality-share", "1.5")
    assert res.exit_code == 2 and "data.patients" in res.output and "data.low_quality_share" in res.output
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("minutes", ["0", "-1"])
def test_row_18_pretrain_with_no_time_is_refused(deploy_run, tmp_path, minutes):
    run = shutil.copytree(deploy_run, tmp_path / "run")
    res = _cli("pretrain", str(run), "--minutes", minutes)
    assert res.exit_code == 2 and "pretrain.max_minutes" in res.output and not (run / "encoders").exists()


def test_row_19_boost_with_no_embeddings_says_why_and_exits_non_zero(deploy_run, tmp_path):
    run = shutil.copytree(deploy_run, tmp_path / "run")
    res = _cli("boost", str(run), "--encoder", "rad-dino")
    assert res.exit_code == 1 and "raddino_xgb: not_run (No RAD-DINO embeddings" in res.output


def test_predict_on_a_folder_of_good_and_bad_files_grades_the_good_ones_and_names_each_bad_one(
        cnn_package, deploy_run, huge_png, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for crop in sorted((deploy_run / "crops").glob("*.png"))[:3]:
        shutil.copy(crop, folder / crop.name)
    shutil.copy(huge_png, folder / "huge.png")
    (folder / "fake.png").write_text("not a png")
    (folder / "notes.txt").write_text("hello")
    res = _cli("predict", str(folder), "--model", str(cnn_package), "--side", "R", "--out", str(tmp_path / "p"))
    assert res.exit_code == 0, res.output
    last = [line for line in res.output.splitlines() if line.strip()][-1]
    assert "3 knee(s) graded, 3 file(s) or knee(s) not graded" in last
    table = pd.read_csv(tmp_path / "p" / "predictions.csv")
    errors = dict(zip(table["file"].map(lambda f: Path(f).name), table["error"].fillna(""), strict=True))
    assert "larger than 100 Mpx" in errors["huge.png"]
    assert "expected DICOM, PNG or JPEG" in errors["fake.png"] and "expected DICOM, PNG or JPEG" in errors["notes.txt"]
    for name in ("huge.png", "fake.png", "notes.txt"):
        (folder / name).rename(tmp_path / name)
    for crop in folder.glob("*.png"):
        crop.unlink()
    for name in ("huge.png", "fake.png", "notes.txt"):
        (tmp_path / name).rename(folder / name)
    res = _cli("predict", str(folder), "--model", str(cnn_package), "--out", str(tmp_path / "q"))
    assert res.exit_code == 1 and "0 knee(s) graded" in res.output


def test_row_22_a_decoder_failure_shows_no_library_traceback_unless_verbose(tmp_path):
    """A knee-tagged 12-bit JPEG Extended file gets past the tags; pydicom's decoders then fail with logged
    tracebacks, which the console shows only with --verbose."""
    import subprocess
    import sys

    import pydicom

    ds = pydicom.dcmread(pydicom.data.get_testdata_file("JPGExtended.dcm"))
    ds.Modality, ds.BodyPartExamined = "CR", "KNEE"
    film = tmp_path / "film.dcm"
    ds.save_as(film)
    kneeoa = [sys.executable, "-c", "from kneeoa.cli.app import app; app()"]
    quiet = subprocess.run([*kneeoa, "predict", str(film), "--out", str(tmp_path / "a")], capture_output=True,
                           text=True, timeout=300)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stdout + quiet.stderr
    loud = subprocess.run([*kneeoa, "--verbose", "predict", str(film), "--out", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=300)
    assert "Traceback" in loud.stdout + loud.stderr


def test_note_4_a_package_reproduces_its_run_whatever_precision_the_run_trained_in(deploy_run, cnn_package, tmp_path):
    """Training precision follows the CPU (bf16-mixed where it has bf16); the run's tables and the package both
    predict in fp32, so the package gives the run's test probabilities on every machine."""
    from deploy_fixtures import crop_list
    from kneeoa.models.cnn.training import resolve_precision
    from kneeoa.runfolder.predictions import prediction_path

    record = json.loads((deploy_run / "arms" / "resnet18.json").read_text())
    assert record["details"]["members"]["multitask"][0]["precision"] == resolve_precision("auto", "auto")
    listing = crop_list(deploy_run, tmp_path / "test.csv")
    table = predict_files(load_model(cnn_package), collect_inputs([listing]), tmp_path / "out", progress=False)
    run = pd.read_parquet(prediction_path(deploy_run, "resnet18", "klg")).set_index("image_id")
    ours = table[[f"klg_p{k}" for k in range(5)]].to_numpy()
    theirs = run.loc[pd.read_csv(listing)["image_id"], [f"prob_{k}" for k in range(5)]].to_numpy()
    assert np.abs(ours - theirs).max() <= 1e-5
