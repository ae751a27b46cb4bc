import pytest
import yaml

from kneeoa.config import Config, backbone_cfg, config_from_dict, dump_config, preset
from kneeoa.config_checks import load_config
from kneeoa.errors import ConfigError


def test_dump_and_load_round_trip(tmp_path):
    cfg = preset("demo")
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_partial_config_keeps_defaults(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("cnn:\n  epochs: 3\n")
    cfg = load_config(path)
    assert cfg.cnn.epochs == 3 and cfg.cnn.batch_size == Config().cnn.batch_size


@pytest.mark.parametrize("data, match", [
    ({"cnn": {"epoch": 3}}, r"Unknown key 'epoch' in config.cnn. Valid keys: backbones"),
    ({"cnn": {"epochs": "ten"}}, r"config.cnn.epochs must be int. Got 'ten'"),
    ({"data": {"split_fractions": 0.7}}, r"config.data.split_fractions must be a list"),
    ({"cnn": {"overrides": {"resnet18": {"lr": "fast"}}}}, None),
])
def test_bad_values_name_the_key(data, match):
    if match is None:
        with pytest.raises(ConfigError, match=r"cnn.overrides.resnet18.lr must be float"):
            backbone_cfg(config_from_dict(data).cnn, "resnet18")
        return
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_overrides_apply_per_backbone():
    cfg = preset("demo")
    assert backbone_cfg(cfg.cnn, "convnext_small").image_size != backbone_cfg(cfg.cnn, "resnet18").image_size


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cnn: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    assert yaml.safe_load(dump_config(Config()))["cnn"]["backbones"] == ["resnet18", "convnext_small"]


def test_shipped_example_configs_load():
    from pathlib import Path

    paths = sorted((Path(__file__).resolve().parents[1] / "examples").rglob("*.yaml"))
    assert any(p.parent.name == "ablations" for p in paths)  # the ablation configs quoted in docs/results.md too
    for path in paths:
        assert load_config(path).stages, path
