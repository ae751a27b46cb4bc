"""Encoder registry, weight resolution, preprocessing from snapshot files, and `kneeoa models`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kneeoa.cli.models import models_app
from kneeoa.config import FoundationCfg
from kneeoa.errors import ConfigError, DataError, WeightsNotFoundError
from kneeoa.models.encoders.base import ClipEncoder
from kneeoa.models.encoders.device import resolve_precision
from kneeoa.models.encoders.foundation import (
    ENCODERS,
    create_encoder,
    features_for,
    get_encoder_spec,
    list_encoders,
    zero_shot_spec,
)
from kneeoa.models.encoders.loaders import LOADERS
from kneeoa.models.hub import folder_revision
from kneeoa.transforms.preprocess import Preprocess
from standins import build_biomedclip, build_raddino


def test_registry_entries_are_data():
    # the paper's two encoders, with their published embedding sizes; more entries may follow
    assert get_encoder_spec("biomedclip").features == {"projected": 512, "pre_projection": 768}
    assert get_encoder_spec("rad-dino").features == {"cls": 768, "cls_mean_patch": 1536}
    for name, spec in ENCODERS.items():
        assert spec.name == name and spec.library in LOADERS and all(d > 0 for d in spec.features.values())
        assert spec.hub_id and spec.licence and spec.paper and spec.preprocess_file in spec.layout.required


def test_features_come_from_the_config_mapping_else_the_entry_default():
    cfg = FoundationCfg()
    assert {n: features_for(cfg, n) for n in list_encoders()} == {
        n: get_encoder_spec(n).default_features for n in list_encoders()}
    cfg.features = {"rad-dino": "cls_mean_patch"}
    assert features_for(cfg, "rad-dino") == "cls_mean_patch"
    cfg.features = {"rad-dino": "mean"}
    with pytest.raises(ConfigError, match=r"foundation.features.rad-dino must be one of \['cls', 'cls_mean_patch'\]"):
        features_for(cfg, "rad-dino")


@pytest.mark.parametrize("name", ["biomedclip", "rad-dino"])  # the entries with stand-in snapshots (conftest)
def test_the_zero_shot_flag_matches_what_the_encoder_can_do(name, standin_snapshots):
    spec = get_encoder_spec(name)
    enc = create_encoder(name, standin_snapshots[name], precision="fp32")
    assert isinstance(enc, ClipEncoder) == spec.zero_shot
    if not spec.zero_shot:
        with pytest.raises(ConfigError, match="has no text tower"):
            zero_shot_spec(name)
    else:
        assert zero_shot_spec(name) is spec and spec.zeroshot_arm == f"{spec.arm_prefix}_zeroshot"


@pytest.mark.parametrize("name", list_encoders())
def test_every_encoder_and_feature_gives_finite_vectors(name, standin_snapshots):
    spec = get_encoder_spec(name)
    dims = {}
    for features in spec.features:
        enc = create_encoder(name, standin_snapshots[name], features=features, precision="fp32")
        out = enc.encode(np.random.default_rng(0).random((3, 40, 48), dtype=np.float32))
        assert out.shape == (3, enc.dim) and out.dtype == np.float32 and np.isfinite(out).all()
        assert enc.model_id == spec.hub_id and len(enc.checksum) == 64 and enc.snapshot.source == "local folder"
        dims[features] = enc.dim
    assert len(set(dims.values())) == len(dims)  # the feature choices really differ


@pytest.mark.parametrize("name", list_encoders())
def test_grayscale_is_repeated_to_three_channels(name, standin_snapshots):
    enc = create_encoder(name, standin_snapshots[name], precision="fp32")
    gray = np.random.default_rng(1).random((2, 36, 36), dtype=np.float32)
    rgb = np.repeat(gray[:, None], 3, axis=1)
    np.testing.assert_allclose(enc.encode(gray), enc.encode(rgb), rtol=1e-5, atol=1e-5)
    # a list of crops of different sizes works too, one by one
    assert enc.encode([gray[0], gray[1][:30]]).shape == (2, enc.dim)


def test_preprocessing_is_read_from_the_snapshot_files(tmp_path, standin_snapshots):
    rd = shutil.copytree(standin_snapshots["rad-dino"], tmp_path / "rd")
    pre = json.loads((rd / "preprocessor_config.json").read_text())
    pre.update(image_mean=[0.1, 0.2, 0.3], size={"shortest_edge": 42}, crop_size={"height": 28, "width": 28})
    (rd / "preprocessor_config.json").write_text(json.dumps(pre))
    enc = create_encoder("rad-dino", rd)
    assert enc.preprocess.mean == (0.1, 0.2, 0.3) and enc.preprocess.size == 42 and enc.preprocess.crop == (28, 28)
    bc = shutil.copytree(standin_snapshots["biomedclip"], tmp_path / "bc")
    oc = json.loads((bc / "open_clip_config.json").read_text())
    oc["preprocess_cfg"]["std"] = [0.5, 0.5, 0.5]
    (bc / "open_clip_config.json").write_text(json.dumps(oc))
    assert create_encoder("biomedclip", bc).preprocess.std == (0.5, 0.5, 0.5)


def test_preprocess_resizes_shortest_edge_and_centre_crops():
    pre = Preprocess(8, (8, 8), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear", "shortest", "test")
    img = np.zeros((1, 16, 32), dtype=np.float32)
    img[0, :, 12:20] = 1.0  # a bright band in the middle columns survives the centre crop
    out = pre(img)
    assert out.shape == (1, 3, 8, 8)
    assert out[0, 0, :, 3:5].mean() > 0.9 and out[0, 0, :, 0].max() < 0.1


def test_missing_folder_names_hub_id_layout_and_fetch_command(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"microsoft/rad-dino.*does not exist.*preprocessor_config\.json"
                       r".*kneeoa models fetch rad-dino.*huggingface-cli download microsoft/rad-dino"):
        create_encoder("rad-dino", tmp_path / "nowhere")


def test_incomplete_folder_names_the_missing_file(tmp_path, standin_snapshots):
    rd = shutil.copytree(standin_snapshots["rad-dino"], tmp_path / "rd")
    (rd / "preprocessor_config.json").unlink()
    with pytest.raises(WeightsNotFoundError, match="missing preprocessor_config.json"):
        create_encoder("rad-dino", rd)


def test_no_weights_anywhere_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsNotFoundError, match=r"BiomedCLIP-PubMedBERT_256.*HF cache.*HF_HUB_OFFLINE=1"):
        create_encoder("biomedclip")


def test_weights_found_in_the_hf_cache_with_their_revision(tmp_path, monkeypatch, standin_snapshots):
    import huggingface_hub.constants as hc

    commit = "a" * 40
    repo = tmp_path / "hub" / "models--microsoft--rad-dino"
    shutil.copytree(standin_snapshots["rad-dino"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    enc = create_encoder("rad-dino")
    assert enc.snapshot.source == "HF cache" and enc.revision == commit


def test_revision_of_a_local_dir_download(tmp_path):
    meta = tmp_path / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    (meta / "config.json.metadata").write_text("b" * 40 + "\netag\n123\n")
    assert folder_revision(tmp_path) == "b" * 40
    assert folder_revision(tmp_path / ".cache") == "unknown"


def test_missing_text_tower_config(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    snap = build_biomedclip(tmp_path / "bc", text_dir=False)
    with pytest.raises(WeightsNotFoundError, match=r"text tower.*config\.json.*BiomedBERT.*--local-dir .*text"):
        create_encoder("biomedclip", snap)


def test_unknown_encoder_suggests_the_nearest():
    with pytest.raises(ConfigError, match="Unknown encoder 'biomedclp'. Valid: biomedclip, rad-dino, kneessl, "
                                          "random. Did you mean 'biomedclip'"):
        create_encoder("biomedclp")


def test_bad_features_precision_and_inputs(standin_snapshots):
    with pytest.raises(ConfigError, match="features of encoder 'rad-dino' must be one of"):
        create_encoder("rad-dino", standin_snapshots["rad-dino"], features="mean")
    with pytest.raises(ConfigError, match="precision.*'auto', 'bf16', 'fp32'. Got 'fp16'"):
        resolve_precision("fp16", "cpu")
    enc = create_encoder("rad-dino", standin_snapshots["rad-dino"])
    with pytest.raises(DataError, match=r"values in \[0, 1\]; got 255 to 255"):
        enc.encode(np.full((1, 30, 30), 255.0, dtype=np.float32))
    with pytest.raises(DataError, match=r"shaped \(B, H, W\)"):
        enc.encode(np.zeros((1, 2, 30, 30), dtype=np.float32))


def test_models_list_verify_and_fetch_cli(tmp_path, standin_snapshots):
    runner = CliRunner()
    res = runner.invoke(models_app, ["list", "--weights-root", str(Path(standin_snapshots["rad-dino"]).parent)])
    assert res.exit_code == 0, res.output
    assert "local folder" in res.output and "microsoft/rad-dino" in res.output
    assert "timm/resnet18.a1_in1k" in res.output and "random init" in res.output  # CNN backbones are listed too
    res = runner.invoke(models_app, ["verify", "rad-dino", "--weights", str(standin_snapshots["rad-dino"])])
    assert res.exit_code == 1 and "expected (2, 768)" in res.output  # a tiny stand-in is not the published model
    res = runner.invoke(models_app, ["fetch", "rad-dino", "--dest", str(tmp_path / "w")])
    assert res.exit_code == 2 and "HF_HUB_OFFLINE" in res.output


@pytest.mark.slow
def test_full_size_snapshots_load_without_code_change(tmp_path):
    """Published architectures from the hub repositories' own config files, random weights: 512 / 768 dims."""
    from kneeoa.cli.models import verify_encoder

    bc = build_biomedclip(tmp_path / "biomedclip", full_size=True)
    assert verify_encoder("biomedclip", bc) == []
    enc = create_encoder("biomedclip", bc)
    assert enc.dim == 512 and enc.preprocess.size == 224 and enc.encode_text(["this is a photo of knee"]).shape == (
        1, 512)
    shutil.rmtree(bc)
    rd = build_raddino(tmp_path / "rad-dino", full_size=True)
    assert verify_encoder("rad-dino", rd) == []
    enc = create_encoder("rad-dino", rd)
    assert enc.dim == 768 and enc.preprocess.crop == (518, 518) and enc.preprocess.mean == (0.5307,) * 3
