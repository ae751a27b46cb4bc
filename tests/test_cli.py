import pytest
import typer
from typer.testing import CliRunner

from kneeoa.cli import app
from kneeoa.stages import STAGES

runner = CliRunner()


def _commands() -> dict:
    """The command line's registered commands by name (click's registry, not the help text)."""
    return typer.main.get_command(app).commands


def test_every_stage_has_a_command_with_help():
    commands = _commands()
    missing = [name for name in STAGES if name not in commands]
    assert not missing, f"stages without a command: {missing}"
    assert {"demo", "run", "phantom", "models", "export", "predict", "serve"} <= set(commands)
    for name in STAGES:
        assert commands[name].help, f"`kneeoa {name}` has no help text"


def test_user_errors_exit_2_with_one_clear_line(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("cnn:\n  epoch: 3\n")
    res = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "Unknown key 'epoch'" in res.output
    res = runner.invoke(app, ["prepare", "folders", str(tmp_path / "none"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "is not a folder" in res.output
    res = runner.invoke(app, ["train", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "empty does not exist" in res.output


def _files(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*")) if folder.exists() else None


@pytest.mark.parametrize("command", ["evaluate", "report", "stats", "explain", "train", "embed", "boost", "zeroshot"])
def test_a_stage_on_an_empty_or_mistyped_folder_refuses_and_writes_nothing(tmp_path, command):
    empty, mistyped = tmp_path / "empty", tmp_path / "no-such-run"
    empty.mkdir()
    for folder in (empty, mistyped):
        res = runner.invoke(app, [command, str(folder)])
        assert res.exit_code == 2, res.output
        assert "Nothing was written" in res.output or "does not exist" in res.output
    assert _files(empty) == [] and not mistyped.exists()


@pytest.mark.parametrize(("command", "missing", "maker"), [
    ("evaluate", "predictions", "kneeoa train"),
    ("report", "metrics.csv", "kneeoa evaluate"),
])
def test_evaluate_and_report_on_a_manifest_only_folder_name_what_is_missing(tiny_run, command, missing, maker):
    before = _files(tiny_run)
    res = runner.invoke(app, [command, str(tiny_run)])
    assert res.exit_code == 2
    text = " ".join(res.output.split())  # the console wraps long lines
    assert missing in text and maker in text and "Nothing was written" in text
    assert _files(tiny_run) == before


def test_stage_commands_use_the_run_folder_config(tiny_run):
    import numpy as np

    from kneeoa.runfolder.predictions import make_prediction_table, write_predictions
    from kneeoa.sources.manifest import read_manifest

    man = read_manifest(tiny_run)
    probs = np.full((len(man), 5), 0.2)
    write_predictions(make_prediction_table(man["image_id"], man["split"], man["klg"], probs), tiny_run, "x", "klg")
    (tiny_run / "config.yaml").write_text("name: from-run-folder\n")
    for command in ("evaluate", "report"):
        res = runner.invoke(app, [command, str(tiny_run)])
        assert res.exit_code == 0, res.output
    assert "from-run-folder" in (tiny_run / "report.html").read_text()


def test_phantom_release_then_prepare_oai(tmp_path):
    rel, run = tmp_path / "release", tmp_path / "run"
    res = runner.invoke(app, ["phantom-release", str(rel), "--patients", "2", "--visits", "1", "--spacing-mm", "0.6",
                              "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert (rel / "truth.csv").exists()
    res = runner.invoke(app, ["prepare", "oai", str(rel), "--out", str(run)])
    assert res.exit_code == 0, res.output
    from kneeoa.sources.manifest import read_manifest

    man = read_manifest(run)
    assert set(man["source"]) == {"oai"} and len(man) >= 2
    res = runner.invoke(app, ["phantom-release", str(tmp_path / "r2"), "--visits", "9"])
    assert res.exit_code == 2 and "visits" in res.output
