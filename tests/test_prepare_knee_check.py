"""`prepare` runs the built-in knee check on every imported image: manifest columns, data report, report section."""

from __future__ import annotations

import shutil

import pytest

from kneeoa.config import Config
from kneeoa.config_checks import validate_config
from kneeoa.errors import ConfigError
from kneeoa.report.knee_check_sections import knee_check_section
from kneeoa.runfolder.manifest import read_data_report
from kneeoa.sources.manifest import read_manifest
from kneeoa.stages.prepare import prepare
from real_data import KNEEKL224, NONKNEE, labels, needs_kneekl224, needs_nonknee


@needs_kneekl224
@needs_nonknee
def test_prepare_flags_the_chest_films_hidden_among_knees(tmp_path):
    root = tmp_path / "kl"
    val = labels("val").head(40)
    for row in val.itertuples():
        target = root / "train" / str(row.kl_grade) / f"{row.patient_id}{row.side}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(KNEEKL224 / row.path, target)
    chests = sorted((NONKNEE / "chest_openist").glob("*.jp*g"))[:4]
    (root / "train" / "2").mkdir(parents=True, exist_ok=True)
    for i, chest in enumerate(chests):
        shutil.copy(chest, root / "train" / "2" / f"99900{i}L.jpg")
    cfg = Config()
    cfg.data.source, cfg.data.path, cfg.tasks.names = "folders", str(root), ["klg"]
    manifest = prepare(tmp_path / "run", cfg)
    assert {"knee_score", "not_knee"} <= set(manifest.columns)
    flagged = manifest[manifest["not_knee"]]
    assert set(flagged["patient_id"]) >= {f"99900{i}" for i in range(4)}
    assert manifest["not_knee"].sum() <= 4 + 1 and len(manifest) == 44  # flagged, never dropped
    report = read_data_report(tmp_path / "run")["knee_check"]
    assert report["checked"] == 44 and report["not_knee"] == len(flagged)
    section = knee_check_section(tmp_path / "run", cfg)
    assert f"<b>{len(flagged)}</b>" in section and "999000" in section
    assert read_manifest(tmp_path / "run")["knee_score"].between(0, 1).all()


def test_prepare_without_the_check_and_with_a_bad_grader(tmp_path):
    cfg = Config()
    cfg.data.patients, cfg.data.visits, cfg.data.image_size, cfg.data.knee_check = 6, 1, 64, "none"
    manifest = prepare(tmp_path / "a", cfg)
    assert "not_knee" not in manifest
    assert "Not run on this import" in knee_check_section(tmp_path / "a", cfg)
    cfg.data.knee_check = "no-such-grader"
    with pytest.raises(ConfigError, match="No model package or built-in grader named 'no-such-grader'"):
        prepare(tmp_path / "b", cfg)
    with pytest.raises(ConfigError, match="data.knee_check: 'no-such-grader' is neither builtin, none, a built-in"):
        validate_config(cfg)
