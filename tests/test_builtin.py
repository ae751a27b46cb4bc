"""The built-in grader: shipped as package data, used when no model is named, reproducing its recipe run, refusing
what is not a knee (real knees, real non-knees and pydicom's own test corpus)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import kneeoa
from kneeoa import builtin as shipped
from kneeoa.cli.app import app
from kneeoa.deploy.builtin import DEFAULT_MODEL, REFERENCE, REPRODUCE_TOL, builtin_root, resolve_model
from kneeoa.deploy.inputs import InputFile
from kneeoa.errors import ConfigError
from real_data import KNEEKL224, NONKNEE, labels, needs_kneekl224, needs_nonknee, real_film

pytest_plugins = ["deploy_fixtures"]


@pytest.fixture(scope="module")
def grader():
    return kneeoa.load_model()


def test_the_default_grader_is_the_shipped_package(grader):
    assert resolve_model() == builtin_root() / DEFAULT_MODEL == grader.model_dir
    assert DEFAULT_MODEL in kneeoa.builtin_models() and grader.tasks == ["klg"]
    assert grader.info["knee_check"]["method"] == "layout_features" and grader._model.knee_check is not None


def test_unknown_models_are_named_errors(tmp_path):
    with pytest.raises(ConfigError, match=f"Built-ins: .*{DEFAULT_MODEL}"):
        resolve_model("no-such-grader")
    with pytest.raises(ConfigError, match="not a kneeoa model package"):
        resolve_model(tmp_path)


def test_builtin_weights_are_small_and_its_card_says_what_it_is():
    folder = builtin_root() / DEFAULT_MODEL
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 5 * 2**20, f"{size / 2**20:.1f} MB"
    card = (folder / "README.md").read_text()
    for words in ("Not a medical device", "Chen P. (2018)", "CC BY 4.0", "Osteoarthritis Initiative",
                  f"kneeoa export runs/kneekl224 --arm twobranch_ens --builtin {DEFAULT_MODEL}", "| klg | val | "
                  "kappa_quadratic |", "knee check"):
        assert words in card, words
    metrics = pd.read_csv(folder / "metrics.csv")
    kappa = metrics.query("split == 'val' and metric == 'kappa_quadratic'").iloc[0]
    assert kappa.ci_low < kappa.value < kappa.ci_high


def test_models_list_shows_the_builtin_with_its_figures(monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    res = CliRunner().invoke(app, ["models", "list"])
    assert res.exit_code == 0, res.output
    assert f"{DEFAULT_MODEL} (default)" in res.output and "kappa_quadratic" in res.output


@needs_kneekl224
def test_builtin_reproduces_its_runs_val_predictions_and_keeps_val_knees(grader, tmp_path):
    reference = pd.read_csv(builtin_root() / DEFAULT_MODEL / REFERENCE)
    assert len(reference) == len(labels("val"))
    items = [InputFile(KNEEKL224 / f, "crop", s) for f, s in zip(reference["file"], reference["side"], strict=True)]
    table = grader.predict(items, out=tmp_path)
    graded = table["error"].fillna("").eq("")
    assert (~graded).mean() <= 0.01, f"{int((~graded).sum())} val knee crops refused"
    cols = [f"klg_p{k}" for k in range(5)]
    diff = np.abs(table.loc[graded, cols].to_numpy(float) - reference.loc[graded.to_numpy(), cols].to_numpy(float))
    assert diff.max() <= REPRODUCE_TOL


@needs_kneekl224
def test_predict_grades_a_film_with_the_builtin_when_no_model_is_named(tmp_path):
    film, rows = real_film(tmp_path / "film.dcm")
    res = CliRunner().invoke(app, ["predict", str(film), "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert sorted(table["side"]) == ["L", "R"] and table["error"].isna().all(), table["error"].tolist()
    assert table["klg"].between(0, 4).all() and (table["knee_score"] > 0).all()


@needs_nonknee
def test_real_non_knee_radiographs_are_refused(grader, tmp_path):
    table = grader.predict(sorted(p for p in NONKNEE.iterdir() if p.is_dir()), out=tmp_path)
    refused = table.groupby("file")["error"].apply(lambda e: e.fillna("").ne("").all())
    assert len(refused) == len(list(NONKNEE.rglob("*.jp*g")))
    assert refused.mean() >= 0.98, f"{int((~refused).sum())} of {len(refused)} graded"
    assert table["klg"].isna().sum() >= 0.98 * len(refused)


def test_every_file_of_pydicoms_test_corpus_is_refused(grader, tmp_path):
    import pydicom

    corpus = Path(pydicom.__file__).parent / "data" / "test_files"
    files = [p for p in sorted(corpus.rglob("*")) if p.is_file() and p.suffix not in (".txt", ".json", ".dump",
                                                                                     ".gz", ".icc")]
    assert len(files) > 150
    table = grader.predict([InputFile(p) for p in files], out=tmp_path)
    graded = table[table["error"].fillna("").eq("")]
    assert graded.empty, graded["file"].tolist()
    assert table["klg"].isna().all() and table["error"].str.len().gt(10).all()


def test_a_builtin_is_rebuilt_from_a_run_in_one_command(deploy_run, tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "root", lambda: tmp_path)
    res = CliRunner().invoke(app, ["export", str(deploy_run), "--arm", "resnet18", "--builtin", "tiny"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "tiny" / "model.json").exists() and (tmp_path / "tiny" / REFERENCE).exists()
    assert resolve_model("tiny") == tmp_path / "tiny"
    assert "kneeoa export runs/kneekl224 --arm resnet18 --builtin tiny" in (tmp_path / "tiny" / "README.md").read_text()
    res = CliRunner().invoke(app, ["export", str(deploy_run), "--arm", "resnet18"])
    assert res.exit_code == 2 and "exactly one of --out" in res.output
