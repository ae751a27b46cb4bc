"""The whole config is checked before any stage runs: registry names, allowed words, ranges, file encoding."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kneeoa.cli.app import app
from kneeoa.config import Config, config_from_dict
from kneeoa.config_checks import CHECKS, config_problems, load_config, validate_config
from kneeoa.errors import ConfigError
from kneeoa.sources.importers import IMPORTERS
from kneeoa.tasks import TASKS

runner = CliRunner()


def test_every_checked_key_exists_and_the_defaults_pass():
    cfg = Config()
    for key in CHECKS:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)  # a renamed config key must be renamed here too
    assert config_problems(cfg) == []


@pytest.mark.parametrize("data, problem", [
    ({"tasks": {"names": ["klg", "osteofytes"]}},
     "tasks.names: 'osteofytes' is not one of: klg, osteophytes, jsn, sclerosis, osteophytes_grade, jsn_grade, "
     "sclerosis_grade, knee_id. Did you mean 'osteophytes'?"),
    ({"cnn": {"backbones": ["resnet81"]}}, "cnn.backbones: 'resnet81' is not one of: resnet18"),
    ({"stages": ["prepare", "trian"]}, "stages: 'trian' is not one of: prepare, train"),
    ({"data": {"source": "folder"}}, "data.source: 'folder' is not one of: manifest, phantom, folders"),
    ({"data": {"localizer": "hough"}}, "data.localizer: 'hough' is not one of:"),
    ({"foundation": {"encoders": ["dino"]}}, "foundation.encoders: 'dino' is not one of:"),
    ({"cnn": {"klg_head": "softmax"}}, "cnn.klg_head: 'softmax' is not one of:"),
    ({"cnn": {"augment_policy": "heavy"}}, "cnn.augment_policy: 'heavy' is not one of: standard, strong"),
    ({"cnn": {"epochs": -3}}, "cnn.epochs: -3 is outside the allowed range [1, inf]."),
    ({"cnn": {"lr": 0}}, "cnn.lr: 0.0 is outside the allowed range (0, inf]."),
    ({"cnn": {"cutpoint_bootstrap": -1}}, "cnn.cutpoint_bootstrap: -1 is outside the allowed range [0, inf]."),
    ({"cnn": {"cutpoint_accuracy_weight": -0.5}}, "cnn.cutpoint_accuracy_weight: -0.5 is outside the allowed range"),
    ({"cnn": {"mixup": -0.2}}, "cnn.mixup: -0.2 is outside the allowed range [0, inf]."),
    ({"cnn": {"class_weight_power": -1}}, "cnn.class_weight_power: -1.0 is outside the allowed range [0, inf]."),
    ({"cnn": {"ensemble_seeds": 2, "member_policies": ["strong"]}},
     "cnn.member_policies: ['strong'] must name one policy per ensemble seed, in seed order (cnn.ensemble_seeds: 2); "
     "it names 1."),
    ({"cnn": {"ensemble_seeds": 2, "member_policies": ["strong", "sharp"]}},
     "cnn.member_policies: 'sharp' is not one of: standard, strong"),
    ({"cnn": {"ensemble_seeds": 2, "together": True, "member_policies": ["strong", "standard"]}},
     "cnn.member_policies: the seeds of a cohort trained together (cnn.together, cnn.mutual) share their augmented"),
    ({"data": {"low_quality_share": 1.5}}, "data.low_quality_share: 1.5 is outside the allowed range [0, 1]."),
    ({"data": {"split_fractions": [0.5, 0.2, 0.2]}}, "data.split_fractions: [0.5, 0.2, 0.2] must be three shares"),
    ({"tasks": {"thresholds": {"jsn": 5}}}, "tasks.thresholds.jsn: 5 is not an OARSI grade 1, 2 or 3."),
    ({"cnn": {"overrides": {"resnet18": {"epochs": 0}}}}, "cnn.overrides.resnet18.epochs: 0 is outside"),
    ({"cnn": {"overrides": {"vgg": {"epochs": 2}}}}, "cnn.overrides: 'vgg' is not one of:"),
    ({"stats": {"compare_metrics": {"binary": ["auroc"]}}}, "stats.compare_metrics.binary: 'auroc' is not one of:"),
    ({"foundation": {"features": {"biomedclip": "cls"}}},
     "foundation.features.biomedclip: 'cls' is not one of: projected, pre_projection."),
    ({"data": {"options": {"nosuch": {"x": 1}}}}, "data.options.nosuch: no importer of that name"),
    ({"fusion": {"methods": ["stacking"]}}, "fusion.methods: 'stacking' is not one of: stack, features."),
    ({"fusion": {"heads": ["svm"]}}, "fusion.heads: 'svm' is not one of: xgb, linear."),
    ({"fusion": {"folds": 1}}, "fusion.folds: 1 is outside the allowed range [2, inf]."),
    ({"fusion": {"stack_c": 0}}, "fusion.stack_c: 0.0 is outside the allowed range (0, inf]."),
    ({"stages": ["prepare", "train", "fusion"], "fusion": {"arms": ["resnet18"]}},
     "fusion.arms: ['resnet18'] names fewer than two arms"),
    ({"fusion": {"arms": ["resnet18", "fusion_stack"]}}, "fusion.arms: 'fusion_stack' is a fused arm"),
    ({"explain": {"occlusion_patch": 1.5}}, "explain.occlusion_patch: 1.5 is outside the allowed range (0, 1]."),
    ({"explain": {"occlusion_stride": 0}}, "explain.occlusion_stride: 0.0 is outside the allowed range (0, 1]."),
    ({"explain": {"occlusion_images": -1}}, "explain.occlusion_images: -1 is outside the allowed range [0, inf]."),
    ({"explain": {"split": "validation"}}, "explain.split: 'validation' is not one of: train, val, test."),
])
def test_each_bad_value_is_named_with_its_choices_or_range(data, problem):
    with pytest.raises(ConfigError) as err:
        validate_config(config_from_dict(data))
    assert problem in str(err.value)


def test_all_problems_are_reported_at_once():
    cfg = config_from_dict({"cnn": {"epochs": -3, "batch_size": 0}, "tasks": {"names": ["osteofytes"]}})
    assert len(config_problems(cfg)) == 3


def test_yaml_floats_without_a_dot_are_floats(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("cnn:\n  lr: 1e-3\n  weight_decay: 5E-2\n  max_minutes: 10\n")
    cfg = load_config(path)
    assert (cfg.cnn.lr, cfg.cnn.weight_decay, cfg.cnn.max_minutes) == (0.001, 0.05, 10.0)
    path.write_text("cnn:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="cnn.lr must be float"):
        load_config(path)


def test_non_utf8_yaml_names_the_byte_and_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_bytes(b"name: study\ndata:\n  path: /data/caf\xe9\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0xe9 on line 3\)"):
        load_config(path)


@pytest.mark.parametrize("text, message", [
    ("tasks:\n  names: [klg, osteofytes]\n", "Did you mean 'osteophytes'?"),
    ("cnn:\n  epochs: -3\n", "cnn.epochs: -3 is outside"),
    (b"name: caf\xe9\n", "is not UTF-8 text"),
    ("cnn: [unclosed\n", "is not valid YAML"),
])
def test_cli_fails_before_any_stage_with_one_message(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    res = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was written
    res = runner.invoke(app, ["phantom", "--out", str(tmp_path / "p"), "--config", str(path)])
    assert res.exit_code == 2 and message in res.output and not (tmp_path / "p").exists()


def test_run_study_checks_stage_names_before_the_first_stage(tmp_path):
    from kneeoa.study import run_study

    with pytest.raises(ConfigError, match="Unknown stage 'evalute'"):
        run_study(Config(), tmp_path / "run", stages=["prepare", "evalute"])
    assert not (tmp_path / "run").exists()


def _number(value) -> float | None:
    """The float a config value stands for (a number, or text in decimal or exponent notation), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and "_" not in value and not any(c.isalpha() and c not in "eE" for c in value):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _in(registry_names, value) -> bool:
    return isinstance(value, str) and value.lower() in registry_names


#: Fuzzed keys -> (is the value valid, the value the config then holds), stated independently of the checks.
_FUZZED = {
    "cnn.epochs": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, lambda v: v),
    "cnn.lr": (lambda v: _number(v) is not None and math.isfinite(_number(v)) and _number(v) > 0, _number),
    "cnn.ema": (lambda v: v is None or (_number(v) is not None and 0 < _number(v) < 1), _number),
    "data.split_fractions": (lambda v: isinstance(v, list) and len(v) == 3 and all(
        _number(x) is not None and 0 <= _number(x) <= 1 for x in v) and abs(sum(map(_number, v)) - 1) <= 1e-6,
        lambda v: [float(x) for x in v]),
    "tasks.names": (lambda v: isinstance(v, list) and all(_in(TASKS.names(), x) for x in v), lambda v: v),
    "data.source": (lambda v: _in([*IMPORTERS.names(), "manifest"], v), lambda v: v),
}


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=8), st.booleans(), st.none(),
                 st.lists(st.integers(), max_size=3), st.lists(st.sampled_from(["klg", "jsn", "jnz", 1]), max_size=3),
                 st.sampled_from(["csv", "Phantom", "manifest", "1e-3", "0.5", "2", "nan"])))
def test_any_value_for_any_checked_key_is_accepted_exactly_when_valid(value):
    """A value is accepted exactly when it is valid, and then held as given; a refusal is a ConfigError that names
    the key."""
    for key, (valid, held) in _FUZZED.items():
        section, name = key.split(".")
        try:
            cfg = validate_config(config_from_dict({section: {name: value}}))
        except ConfigError as e:
            assert not valid(value), f"{key}: {value!r} refused: {e}"
            assert key in str(e)
            continue
        assert valid(value), f"{key}: {value!r} accepted"
        got = getattr(getattr(cfg, section), name)
        assert got == held(value) or (got is None and value is None), key


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=1e-9, max_value=1e9, allow_nan=False, allow_infinity=False))
def test_float_text_in_any_notation_reads_as_that_float(x):
    for text in (f"{x:e}", f"{x:E}", repr(x), f"{x:.3g}"):
        assert config_from_dict({"cnn": {"lr": text}}).cnn.lr == float(text)
