from typer.testing import CliRunner

from kneeoa.cli import app

runner = CliRunner()


def test_help_lists_every_stage_command():
    out = runner.invoke(app, ["--help"]).output
    for cmd in ("demo", "run", "phantom", "prepare", "train", "evaluate", "report"):
        assert cmd in out


def test_user_errors_exit_2_with_one_clear_line(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("cnn:\n  epoch: 3\n")
    res = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "Unknown key 'epoch'" in res.output
    res = runner.invoke(app, ["prepare", "folders", str(tmp_path / "none"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "is not a folder" in res.output
    res = runner.invoke(app, ["train", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "manifest.parquet does not exist" in res.output


def test_stage_commands_use_the_run_folder_config(tiny_run):
    (tiny_run / "config.yaml").write_text("name: from-run-folder\n")
    res = runner.invoke(app, ["report", str(tiny_run)])
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
    from kneeoa.data.manifest import read_manifest

    man = read_manifest(run)
    assert set(man["source"]) == {"oai"} and len(man) >= 2
    res = runner.invoke(app, ["phantom-release", str(tmp_path / "r2"), "--visits", "9"])
    assert res.exit_code == 2 and "visits" in res.output
