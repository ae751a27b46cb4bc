"""The Python API: `kneeoa.load_model()` and its `Grader`, the README's example run as written."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import kneeoa
from kneeoa.cli.app import app
from kneeoa.errors import ConfigError
from real_data import KNEEKL224, labels, needs_kneekl224, real_film

pytest_plugins = ["deploy_fixtures"]
README = Path(__file__).resolve().parents[1] / "README.md"


def test_public_surface_is_named_and_documented():
    assert set(kneeoa.__all__) >= {"load_model", "Grader", "builtin_models"}
    for name in kneeoa.__all__:
        obj = getattr(kneeoa, name)
        assert name == "__version__" or (obj.__doc__ or "").strip(), name
    with pytest.raises(AttributeError):
        _ = kneeoa.no_such_thing


@needs_kneekl224
def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len(block.strip().splitlines()) <= 6
    real_film(tmp_path / "film.dcm")
    shutil.copy(KNEEKL224 / labels("val")["path"][0], tmp_path / "knee.png")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, str(README), "exec"), scope)
    table, maps = scope["table"], scope["maps"]
    assert list(table["file"]).count("film.dcm") == 2 and (table["file"] == "knee.png").sum() == 1
    assert table["error"].fillna("").eq("").all() and table["klg"].notna().all()
    assert len(maps) == 1 and maps[0]["map"].shape == maps[0]["crop"].shape and 0 <= maps[0]["map"].min()


def test_api_table_equals_the_cli_table(cnn_package, deploy_run, tmp_path):
    crops = sorted((deploy_run / "crops").glob("*.png"))[:6]
    grader = kneeoa.load_model(cnn_package)
    api = grader.predict(crops, out=tmp_path / "api", side="L")
    res = CliRunner().invoke(app, ["predict", *map(str, crops), "--model", str(cnn_package), "--side", "L",
                                   "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    cli = pd.read_csv(tmp_path / "cli" / "predictions.csv")
    assert list(api.columns) == list(cli.columns)
    saved = pd.read_csv(tmp_path / "api" / "predictions.csv")
    for col in cli.columns:
        if col in ("crop", "cam"):
            continue
        pd.testing.assert_series_equal(saved[col], cli[col], check_names=False)


def test_numpy_crops_grade_as_their_files(cnn_package, deploy_run, tmp_path):
    from kneeoa.formats.images import load_gray

    grader = kneeoa.load_model(cnn_package)
    crop = sorted((deploy_run / "crops").glob("*.png"))[0]
    from_file = grader.predict([crop], side="R")
    as_float = grader.predict([load_gray(crop)], side="R")
    as_uint16 = grader.predict(np.round(load_gray(crop) * 65535).astype(np.uint16), side="R")
    cols = [c for c in from_file.columns if c.startswith("klg_p")]
    assert np.allclose(as_float[cols].to_numpy(float), from_file[cols].to_numpy(float), atol=1e-6)
    assert np.allclose(as_uint16[cols].to_numpy(float), from_file[cols].to_numpy(float), atol=1e-6)
    assert as_float["file"].tolist() == ["<array 0>"] and as_float["crop"].isna().all()


def test_bad_arrays_and_tasks_are_named_errors(cnn_package, deploy_run):
    grader = kneeoa.load_model(cnn_package)
    with pytest.raises(ConfigError, match="one 2-D grayscale image"):
        grader.predict(np.zeros((4, 64, 64, 3)))
    with pytest.raises(ConfigError, match=r"outside \[0, 1\]"):
        grader.predict(np.full((64, 64), 3.0))
    with pytest.raises(ConfigError, match="no task 'wrist'"):
        grader.explain(sorted((deploy_run / "crops").glob("*.png"))[:1], task="wrist")
    with pytest.raises(ConfigError, match="No model package or built-in grader"):
        kneeoa.load_model("not-a-grader")


def test_explain_returns_a_map_per_knee_and_task(cnn_package, deploy_run):
    grader = kneeoa.load_model(cnn_package)
    crops = sorted((deploy_run / "crops").glob("*.png"))[:2]
    maps = grader.explain(crops, side="R")
    assert len(maps) == 2 * len(grader.tasks)
    for m in maps:
        assert m["map"].shape == m["crop"].shape and np.isfinite(m["map"]).all() and m["map"].max() <= 1
    assert len(grader.explain(crops, task="klg", side="R")) == 2
