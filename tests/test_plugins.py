"""A backbone, an encoder, a task, an importer or a localiser from outside the package is one entry point of its
group and no edit in src/: the toy package of tests/plugin_package.py (fixture `outside_plugins`) is taken up by the
factories, the config checks, the stages, the command line and the report. A plugin that cannot be used fails with
its distribution, its entry point and the fix."""

from __future__ import annotations

import html
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from kneeoa.cli.app import app
from kneeoa.config import Config
from kneeoa.config_checks import validate_config
from kneeoa.errors import ConfigError
from kneeoa.localize.core import LOCALIZERS
from kneeoa.localize.films import locate_knees
from kneeoa.models.cnn.backbones import BACKBONES, MultiTaskNet, create_backbone
from kneeoa.models.encoders.foundation import ENCODERS, create_encoder, list_encoders
from kneeoa.registry import PluginError
from kneeoa.runfolder.manifest import read_manifest
from kneeoa.sources.importers import IMPORTERS
from kneeoa.synthetic.phantom import render_spec, simulate_cohort
from kneeoa.synthetic.phantom.films import render_film
from kneeoa.tasks import TASKS, binarised_tasks
from plugin_package import TOY, TOY_DIST, TOY_ENTRIES, installed, write_distribution, write_toy_package

REGISTRIES = {"kneeoa.backbones": BACKBONES, "kneeoa.encoders": ENCODERS, "kneeoa.tasks": TASKS,
              "kneeoa.importers": IMPORTERS, "kneeoa.localizers": LOCALIZERS}
#: A second outside distribution, for the error paths.
BROKEN = "kneeoa_broken_plugin"
runner = CliRunner()


def toy_config(**data) -> Config:
    """A config naming the toy entry of every group."""
    cfg = Config()
    cfg.cnn.backbones, cfg.tasks.names, cfg.tasks.thresholds = [TOY], ["klg", TOY], {TOY: 2}
    cfg.data.source, cfg.data.localizer, cfg.foundation.encoders = TOY, TOY, [TOY]
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def table_rows(fragment: str, *, key: str) -> dict[str, dict[str, str]]:
    """The rows of the one HTML table in a report fragment, by their `key` column: {key: {column: cell text}}."""
    header, *body = (re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)
                     for row in re.findall(r"<tr[^>]*>(.*?)</tr>", fragment, re.S))
    rows = [dict(zip(header, map(html.unescape, cells), strict=True)) for cells in body]
    return {row[key]: row for row in rows}


def phantom_crops(n_patients: int = 2) -> list[np.ndarray]:
    specs = simulate_cohort(patients=n_patients, visits=1, seed=0, low_quality_share=0.0)
    return [render_spec(s, out_px=64).image for s in specs]


# ---------------------------------------------------------------------------------------------- the toy package


def test_each_group_takes_the_outside_entry_after_the_built_ins(outside_plugins):
    module = outside_plugins["module"]
    for group, attr in TOY_ENTRIES.items():
        registry = REGISTRIES[group]
        assert registry.group == group and registry.names()[-1] == TOY and TOY in registry
        assert registry.get(TOY) is getattr(module, attr)
    assert binarised_tasks()[-1] == TOY  # a binarised task: its threshold is configurable like the built-ins'


def test_without_the_package_the_toy_names_are_refused():
    assert not any(TOY in registry for registry in REGISTRIES.values())
    with pytest.raises(ConfigError) as refused:
        validate_config(toy_config())
    for key in ("cnn.backbones", "tasks.names", "tasks.thresholds", "data.source", "data.localizer",
                "foundation.encoders"):
        assert f"{key}: 'toy' is not one of" in str(refused.value), key


def test_the_config_checks_take_every_toy_entry(outside_plugins):
    cfg = validate_config(toy_config())
    assert cfg.data.localizer == cfg.data.source == cfg.cnn.backbones[0] == TOY
    cfg.tasks.thresholds = {"klg": 1}
    with pytest.raises(ConfigError, match=r"tasks.thresholds: 'klg' is not one of: osteophytes, jsn, sclerosis, toy"):
        validate_config(cfg)


def test_the_toy_backbone_builds_through_the_factory_and_learns(outside_plugins):
    torch.manual_seed(0)
    net, error = create_backbone(TOY, source=None, in_chans=1)
    assert error is None and isinstance(net, outside_plugins["module"].ToyNet)
    model = MultiTaskNet(net, {TOY: 2})
    x = torch.from_numpy(np.stack(phantom_crops())[:, None]).float()
    y = torch.tensor([0, 1, 0, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x)[TOY], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_a_tiny_phantom_run_trains_the_toy_backbone_on_the_toy_task_and_reports_both(outside_plugins, tmp_path):
    from kneeoa.report.core import data_section
    from kneeoa.report.ssl_sections import four_way_section
    from kneeoa.runfolder.arms import read_arms
    from kneeoa.runfolder.predictions import prediction_path, read_predictions
    from kneeoa.stages import boost, embed, evaluate, train
    from kneeoa.stages.prepare import prepare

    cfg = toy_config(source="phantom", patients=10, visits=1, image_size=64, knee_check="none")
    cfg.tasks.thresholds = {}
    cfg.cnn.image_size, cfg.cnn.epochs, cfg.cnn.batch_size, cfg.cnn.pretrained = 32, 1, 8, "none"
    cfg.foundation.weights = {TOY: str(outside_plugins["encoder_weights"])}
    cfg.foundation.precision, cfg.foundation.linear_probe = "fp32", False
    cfg.foundation.xgb_grid, cfg.foundation.xgb_n_estimators = {"max_depth": [2]}, 10
    cfg.stats.n_boot = 10
    validate_config(cfg)
    run = tmp_path / "run"
    prepare(run, cfg, source="phantom")
    manifest = read_manifest(run)
    assert manifest[TOY].tolist() == (manifest["jsn_m"] >= 1).astype(int).tolist()  # the toy task's own label
    train.run(run, cfg)
    embed.run(run, cfg)
    boost.run(run, cfg)
    evaluate.run(run, cfg)
    arms = read_arms(run)
    for arm in (TOY, "toy_xgb"):
        assert arms[arm]["status"] == "ran", arms[arm]
        _, task, table = read_predictions(prediction_path(run, arm, TOY))
        assert task == TOY and set(table["split"]) == {"train", "val", "test"}
        assert np.allclose(table[["prob_0", "prob_1"]].sum(axis=1), 1)
    data = data_section(run, cfg)
    assert "toy: images per grade and split" in data
    rows = table_rows(four_way_section(run, cfg), key="arm")
    assert rows["toy_xgb"]["family"] == "toy plugin family" and rows[TOY]["family"] == "supervised CNN"
    assert rows["toy_xgb"][TOY].startswith("auc ") and rows["raddino_xgb"][TOY] == "not run (no weights)"


def test_the_toy_encoder_is_listed_and_embeds_phantom_crops(outside_plugins):
    assert list_encoders()[-1] == TOY
    enc = create_encoder(TOY, outside_plugins["encoder_weights"], precision="fp32", device="cpu")
    crops = phantom_crops()
    out = enc.encode(crops)
    assert out.shape == (len(crops), 16) and out.dtype == np.float32 and np.isfinite(out).all()
    assert not np.allclose(out[0], out[1]) and np.array_equal(out, enc.encode(crops))
    assert enc.describe()["encoder"] == TOY and enc.dim == 16


def test_the_toy_importer_is_a_prepare_command_that_writes_a_manifest(outside_plugins, tmp_path):
    res = runner.invoke(app, ["prepare", "--help"])
    assert res.exit_code == 0 and "toy" in res.output and "Import toy phantom knees" in res.output
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"data": {"image_size": 32, "knee_check": "none"}}))
    run = tmp_path / "run"
    res = runner.invoke(app, ["prepare", TOY, "--out", str(run), "--config", str(config), "--patients", "3"])
    assert res.exit_code == 0, res.output
    manifest = read_manifest(run)
    assert len(manifest) == 6 and set(manifest["source"]) == {TOY}
    assert all((run / p).is_file() for p in manifest["image_path"])
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["source"] == TOY


def test_the_film_step_uses_the_toy_localizer(outside_plugins):
    calls = outside_plugins["module"].CALLS
    right, left = simulate_cohort(patients=1, visits=1, seed=5, low_quality_share=0.0)[:2]
    film, centres, px = render_film(right, left, spacing_mm=0.5, rng=np.random.default_rng(5))
    found, missed = locate_knees(film, (px, px), localizer=TOY, sides=["R", "L"])
    assert calls == [2] and not missed and set(found) == {"R", "L"}
    for side, (row, col) in centres.items():
        assert np.hypot(found[side].row_px - row, found[side].col_px - col) * px < 5.0


def test_a_subprocess_finds_the_package_on_its_pythonpath(outside_plugins):
    out = subprocess.run([sys.executable, "-c", "from kneeoa.tasks import TASKS; print(TASKS.names()[-1])"],
                         capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == TOY


def test_uninstalling_the_package_takes_its_entries_back(tmp_path):
    with installed(write_toy_package(tmp_path)):
        assert TASKS.get(TOY).sources == ("jsn_m",) and all(TOY in r for r in REGISTRIES.values())
    assert not any(TOY in registry for registry in REGISTRIES.values())
    assert TOY_DIST not in sys.modules and str(tmp_path) not in sys.path


# ---------------------------------------------------------------------------------------------- the error paths


def test_a_plugin_that_fails_to_import_names_its_distribution_entry_point_and_fix(tmp_path):
    root = write_distribution(tmp_path, BROKEN, {"kneeoa.backbones": {"broken": f"{BROKEN}:BACKBONE"}},
                              {BROKEN: "import kneeoa_no_such_dependency\n"})
    with installed(root):
        assert "broken" in BACKBONES  # its name is known without importing it
        assert BACKBONES.get("resnet18").name == "resnet18"  # the built-ins still work
        with pytest.raises(PluginError) as failed:
            create_backbone("broken", source=None)
        assert str(failed.value) == (
            f"The backbone 'broken' of distribution '{BROKEN}' (entry point `broken = {BROKEN}:BACKBONE` in group "
            "'kneeoa.backbones') fails to import: ModuleNotFoundError: No module named 'kneeoa_no_such_dependency'. "
            "Fix or reinstall the distribution, or uninstall it.")
    assert "broken" not in BACKBONES


@pytest.mark.parametrize(("group", "value", "problem"), [
    ("kneeoa.encoders", f"{BROKEN}:TASK", r"is of type Task, not a kneeoa.models.encoders.spec.EncoderSpec; point "
                                          r"the entry point at a kneeoa.models.encoders.spec.EncoderSpec"),
    ("kneeoa.localizers", f"{BROKEN}:TASK", r"is of type Task, not a collections.abc.Callable"),
    ("kneeoa.tasks", f"{BROKEN}:TASK", r"carries the name 'other'; name the entry point 'other' or rename the "
                                       r"object to 'wrong'"),
])
def test_a_plugin_of_the_wrong_kind_or_name_says_what_it_should_point_to(tmp_path, group, value, problem):
    module = "from kneeoa.tasks import Task\n\nTASK = Task('other', 'binary', ('no', 'yes'))\n"
    root = write_distribution(tmp_path, BROKEN, {group: {"wrong": value}}, {BROKEN: module})
    with installed(root):
        with pytest.raises(PluginError, match=rf"'wrong' of distribution '{BROKEN}' \(entry point `wrong = "
                                              rf"{value}` in group '{group}'\) {problem}"):
            REGISTRIES[group].get("wrong")


def test_a_plugin_named_like_a_built_in_is_refused_at_every_lookup(tmp_path):
    root = write_distribution(tmp_path, BROKEN, {"kneeoa.tasks": {"KLG": "kneeoa.tasks:TASKS"}})
    with installed(root):
        for lookup in (lambda: TASKS.get("jsn"), TASKS.names, lambda: validate_config(Config())):
            with pytest.raises(PluginError, match=rf"The task 'klg' of distribution '{BROKEN}' \(entry point `KLG = "
                                                  r"kneeoa.tasks:TASKS` in group 'kneeoa.tasks'\) clashes with the "
                                                  r"built-in task 'klg'. Rename the entry point"):
                lookup()
    assert TASKS.get("klg").primary  # the package gone, the built-in is back


def test_two_plugins_of_one_name_are_refused(outside_plugins, tmp_path):
    root = write_distribution(tmp_path, BROKEN, {"kneeoa.localizers": {TOY: f"{TOY_DIST}:localize_toy"}})
    with installed(root):
        with pytest.raises(PluginError, match="Two plugins declare the localizer 'toy'") as clash:
            LOCALIZERS.get("profile")
        assert f"distribution '{TOY_DIST}'" in str(clash.value) and f"distribution '{BROKEN}'" in str(clash.value)
    assert LOCALIZERS.get(TOY) is outside_plugins["module"].localize_toy


def test_a_clashing_importer_plugin_is_one_line_and_exit_2_on_the_command_line(tmp_path):
    root = write_distribution(tmp_path, BROKEN, {"kneeoa.importers": {"folders": "kneeoa.sources.importers:IMPORTERS"}})
    with installed(root):
        result = runner.invoke(app, ["prepare", "--help"])
    assert result.exit_code == 2, result.output
    assert "clashes with the built-in importer 'folders'" in " ".join(result.output.split())
    assert "Traceback" not in result.output
