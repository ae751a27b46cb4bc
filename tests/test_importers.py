"""Every registered importer, on its own tiny fixture, through the same manifest checks; and a toy importer
registered at runtime gets its `kneeoa prepare` sub-command and config section with no other edit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from kneeoa.cli.app import app
from kneeoa.config import Config, config_from_dict
from kneeoa.config_checks import validate_config
from kneeoa.errors import ConfigError
from kneeoa.formats.images import load_gray
from kneeoa.sources.importers import (
    IMPORTERS,
    ImporterOption,
    ImporterSpec,
    ImportResult,
    ImportTarget,
    importer_option,
)
from kneeoa.sources.manifest import REQUIRED, read_manifest, resolve_image_path
from kneeoa.stages.prepare import prepare

runner = CliRunner()


def _png(path: Path, value: int = 120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 24), value, np.uint8)).save(path)
    return path


def _phantom(tmp_path: Path, cfg: Config) -> Path | None:
    cfg.data.patients, cfg.data.visits, cfg.data.image_size = 3, 1, 64
    return None


def _folders(tmp_path: Path, cfg: Config) -> Path:
    for i, grade in enumerate([0, 1, 2, 3, 4, 2]):
        _png(tmp_path / "kl" / str(grade) / f"{9000 + i}{'LR'[i % 2]}.png")
    (tmp_path / "kl" / "README.txt").write_text("not an image")
    return tmp_path / "kl"


def _csv(tmp_path: Path, cfg: Config) -> Path:
    rows = [(str(_png(tmp_path / "img" / f"k{i}.png").relative_to(tmp_path)), f"P{i}", "RL"[i % 2], i % 5)
            for i in range(6)]
    pd.DataFrame(rows, columns=["image_path", "patient_id", "side", "klg"]).to_csv(tmp_path / "t.csv", index=False)
    return tmp_path / "t.csv"


def _oai(tmp_path: Path, cfg: Config) -> Path:
    from kneeoa.synthetic.phantom.films import write_phantom_release

    write_phantom_release(tmp_path / "release", patients=3, visits=1, seed=0, spacings_mm=(0.6,), workers=1)
    cfg.data.image_size = 64
    return tmp_path / "release"


#: One tiny source per built-in importer; an importer registered without a fixture here fails the first test.
FIXTURES = {"phantom": _phantom, "folders": _folders, "csv": _csv, "oai": _oai}


def test_every_registered_importer_has_a_fixture():
    assert set(IMPORTERS.names()) == set(FIXTURES)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_importer_contract(tmp_path, name):
    cfg = Config()
    cfg.data.workers = 1
    source = FIXTURES[name](tmp_path, cfg)
    run = tmp_path / "run"
    df = prepare(run, cfg, source=name, path=source)
    back = read_manifest(run)  # the same validation every stage applies
    assert len(back) == len(df) > 0 and set(REQUIRED) <= set(back.columns)
    assert set(back["source"]) == {name} and back["image_id"].is_unique
    for path in back["image_path"]:
        assert load_gray(resolve_image_path(run, path)).ndim == 2
    assert back["klg"].dropna().between(0, 4).all()
    assert set(back["split"]) <= {"train", "val", "test"}
    for table in ("quarantine.parquet", "skipped.parquet"):
        if (run / table).exists():
            t = pd.read_parquet(run / table)
            assert list(t.columns) == ["item", "reason"] and (t["reason"].str.len() > 0).all()
    written = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert written["source"] == name and written["path"] == (str(source) if source else None)


def import_toy(source: Path | None, target: ImportTarget, cfg) -> ImportResult:
    """A runtime-registered importer: one crop per line of a text file, labelled by its own option."""
    grade = importer_option(cfg, "toy", "grade")
    rows = []
    for i, line in enumerate(Path(source).read_text().split()):
        _png(target.crop_file(line))
        rows.append({"image_id": line, "patient_id": f"T{i}", "visit": 0, "side": "R", "low_quality": False,
                     "image_path": target.manifest_path(target.crop_file(line)), "source": "toy", "klg": grade})
    return ImportResult(manifest=pd.DataFrame(rows))


@pytest.fixture
def toy_importer():
    spec = IMPORTERS.add("toy", ImporterSpec("test_importers:import_toy", "Import the toy list.",
                                             "A text file of image ids.",
                                             (ImporterOption("grade", int, "KL grade of every image", default=1),)))
    yield spec
    IMPORTERS.remove("toy")


def test_runtime_importer_gets_a_prepare_command_and_a_config_section(tmp_path, toy_importer):
    (tmp_path / "ids.txt").write_text(" ".join(f"k{i}" for i in range(8)))
    res = runner.invoke(app, ["prepare", "--help"])
    assert res.exit_code == 0 and "toy" in res.output and "Import the toy list." in res.output
    res = runner.invoke(app, ["prepare", "toy", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "run"),
                              "--grade", "3"])
    assert res.exit_code == 0, res.output
    assert set(read_manifest(tmp_path / "run")["klg"]) == {3}
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert written["source"] == "toy" and written["options"] == {"toy": {"grade": 3}}
    cfg = validate_config(config_from_dict({"data": {"source": "toy", "options": {"toy": {"grade": 2}}}}))
    assert importer_option(cfg, "toy", "grade") == 2
    with pytest.raises(ConfigError, match=r"data.options.toy.colour: not an option of 'toy'; its own options: grade"):
        validate_config(config_from_dict({"data": {"options": {"toy": {"colour": "red"}}}}))
    with pytest.raises(ConfigError, match=r"data.options.toy.grade must be int"):
        validate_config(config_from_dict({"data": {"options": {"toy": {"grade": "high"}}}}))


def test_prepare_subcommands_come_from_the_registry():
    res = runner.invoke(app, ["prepare", "--help"])
    for name in IMPORTERS.names():
        assert name in res.output
    res = runner.invoke(app, ["prepare", "csv", "--help"])
    assert "--csv-kind" in res.output and "--crop-mm" in res.output and "--csv-columns" not in res.output


def test_prepare_flags_override_the_config_only_when_given(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("seed: 3\ndata:\n  patients: 2\n  visits: 1\n  image_size: 64\n  low_quality_share: 0.5\n")
    res = runner.invoke(app, ["phantom", "--out", str(tmp_path / "a"), "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    a = read_manifest(tmp_path / "a")
    assert len(a) == 4 and a["low_quality"].sum() == 2 and load_gray(tmp_path / "a" / a["image_path"][0]).shape == (
        64, 64)
    written = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert written["seed"] == 3 and written["data"]["patients"] == 2
    res = runner.invoke(app, ["phantom", "--out", str(tmp_path / "b"), "--config", str(cfg), "--patients", "3"])
    assert res.exit_code == 0 and read_manifest(tmp_path / "b")["patient_id"].nunique() == 3
