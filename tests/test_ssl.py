"""Self-supervised knee encoder: the NT-Xent loss, `kneeoa pretrain` (resume, time cap, outputs), its use through
embed -> boost and as CNN starting weights, the random-weights control, and the bad-input paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import kneeoa.stages.pretrain as pretrain
from kneeoa.cli.app import app
from kneeoa.config import Config
from kneeoa.errors import ConfigError, DataError, WeightsNotFoundError
from kneeoa.models.cnn.backbones import BACKBONES, create_backbone, resolve_pretrained
from kneeoa.models.cnn.ssl import nt_xent
from kneeoa.models.encoders.foundation import create_encoder
from kneeoa.runfolder.arms import read_arms
from kneeoa.runfolder.embeddings import embedding_matrix, read_embeddings
from kneeoa.runfolder.encoders import encoder_dir, pretrain_state_path
from kneeoa.stages import boost, embed


def _cfg(**pretrain_keys) -> Config:
    cfg = Config()
    cfg.pretrain.image_size = 32
    cfg.pretrain.batch_size = 8
    cfg.pretrain.epochs = 2
    cfg.pretrain.max_minutes = 10.0
    for key, value in pretrain_keys.items():
        setattr(cfg.pretrain, key, value)
    cfg.foundation.precision = "fp32"
    return cfg


@pytest.fixture
def pretrained_run(tiny_run: Path) -> Path:
    pretrain.run(tiny_run, _cfg(), progress=False)
    return tiny_run


# --- the loss ------------------------------------------------------------------------------------------------------

def test_nt_xent_of_orthogonal_exact_pairs_matches_the_formula():
    b, t = 4, 0.5
    z = torch.eye(b) * 3.0  # scale is irrelevant: rows are normalised
    # each view: its partner at cosine 1, the 2B - 2 others at cosine 0
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + (2 * b - 2)))
    assert nt_xent(z, z.clone(), temperature=t).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_is_log_2b_minus_1_when_views_cannot_be_told_apart():
    z = torch.ones(5, 3)
    assert nt_xent(z, z, temperature=0.1).item() == pytest.approx(math.log(9), rel=1e-6)


def test_nt_xent_prefers_matching_pairs_and_has_gradients():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 8, generator=g, requires_grad=True)
    matched = nt_xent(z1, z1.detach() + 0.01 * torch.randn(6, 8, generator=g))
    shuffled = nt_xent(z1, z1.detach()[torch.tensor([1, 2, 3, 4, 5, 0])])
    assert matched.item() < shuffled.item()
    matched.backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


def test_nt_xent_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="two \\(B, D\\) tensors"):
        nt_xent(torch.zeros(4, 3), torch.zeros(5, 3))


def test_learning_rate_warms_up_then_anneals_to_zero():
    assert pretrain.lr_factor(0.0) < pretrain.lr_factor(pretrain.WARMUP) == pytest.approx(1.0)
    assert pretrain.lr_factor(0.5) == pytest.approx(0.5 * (1 + math.cos(math.pi * (0.5 - pretrain.WARMUP)
                                                                         / (1 - pretrain.WARMUP))))
    assert pretrain.lr_factor(1.0) == pytest.approx(0.0, abs=1e-12)


# --- pretrain -> embed -> boost -------------------------------------------------------------------------------------

def test_pretrain_writes_a_loadable_encoder_folder_with_a_model_card(pretrained_run):
    folder = encoder_dir(pretrained_run, "kneessl")
    info = json.loads((folder / "config.json").read_text())
    assert info["backbone"] == "twobranch" and info["image_size"] == 32 and info["feature_dim"] == 256
    assert info["n_images"] == 16 and info["splits"] == ["train"]  # 8 train patients x 2 knees; val/test left out
    assert info["steps"] == 4 and info["epochs"] == 2 and info["stopped_by"] == "epochs"
    card = (folder / "README.md").read_text()
    assert "16 images" in card and "SimCLR" in card and "loss_curve.png" in card
    assert (folder / "loss_curve.png").stat().st_size > 0
    assert len((folder / "loss_curve.csv").read_text().splitlines()) == 3  # header + 2 epochs
    assert not pretrain_state_path(pretrained_run).exists()  # a finished run leaves no resume state
    # the backbone's own loader takes the weights file, and they are not the random init
    from safetensors.torch import load_file

    stored = load_file(str(folder / "model.safetensors"))
    net, _ = create_backbone("twobranch", source=str(folder / "model.safetensors"))
    assert all(torch.equal(net.state_dict()[k], v) for k, v in stored.items())
    fresh, _ = create_backbone("twobranch", source=None)
    assert set(stored) == set(fresh.state_dict())


@pytest.fixture
def phantom_pretrained_run(tmp_path: Path) -> Path:
    """A tiny phantom study (16 patients, one visit) with its knee encoder pretrained."""
    from kneeoa.stages.prepare import prepare

    cfg = _cfg()
    cfg.data.patients, cfg.data.visits, cfg.data.image_size = 16, 1, 64
    run = tmp_path / "phantom"
    prepare(run, cfg, source="phantom")
    pretrain.run(run, cfg, progress=False)
    return run


def test_pretrain_embed_boost_writes_the_kneessl_and_random_arms(phantom_pretrained_run):
    from kneeoa.runfolder.manifest import read_manifest

    pretrained_run = phantom_pretrained_run
    cfg = _cfg()
    cfg.foundation.xgb_grid, cfg.foundation.xgb_n_estimators = {"max_depth": [2]}, 20
    for name in ("kneessl", "random"):
        embed.embed_one(pretrained_run, name, None, cfg, progress=False)
        cfg.foundation.encoders = [name]
        boost.run(pretrained_run, cfg)
    arms = read_arms(pretrained_run)
    for arm in ("kneessl_xgb", "kneessl_linear", "random_xgb", "random_linear"):
        assert arms[arm]["status"] == "ran"
        assert (pretrained_run / "predictions" / f"{arm}__klg.parquet").exists()
    assert str(encoder_dir(pretrained_run, "kneessl").resolve()) in read_embeddings(pretrained_run, "kneessl")[1][
        "weights_path"]
    ssl_x = embedding_matrix(read_embeddings(pretrained_run, "kneessl")[0])
    rnd_x = embedding_matrix(read_embeddings(pretrained_run, "random")[0])
    n_images = len(read_manifest(pretrained_run))
    assert ssl_x.shape == rnd_x.shape == (n_images, 256) and not np.allclose(ssl_x, rnd_x)
    # the report's four-way picture: knee SSL with a number, the hub encoders "not run (no weights)"
    from kneeoa.report.ssl_sections import four_way_section
    from kneeoa.stages import evaluate

    evaluate.run(pretrained_run, cfg)
    cfg.stats.compare_split = "val"
    section = four_way_section(pretrained_run, cfg)
    assert "knee SSL" in section and "kappa_quadratic" in section and "no predictions" not in section
    assert section.count("not run (no weights)") == 2 * len(cfg.tasks.names)  # biomedclip, rad-dino


def test_random_encoder_is_reproducible_and_independent_of_the_global_seed():
    images = np.random.default_rng(0).random((3, 40, 40), dtype=np.float32)
    torch.manual_seed(123)
    a = create_encoder("random", precision="fp32", device="cpu")
    torch.manual_seed(456)
    b = create_encoder("random", precision="fp32", device="cpu")
    assert a.checksum == b.checksum and a.revision == "seed-0"
    np.testing.assert_array_equal(a.encode(images), b.encode(images))
    assert a.encode(images).shape == (3, 256)


def test_kneessl_loads_another_folder_given_as_weights(pretrained_run, tmp_path):
    moved = tmp_path / "elsewhere"
    encoder_dir(pretrained_run, "kneessl").rename(moved)
    enc = create_encoder("kneessl", moved, precision="fp32", device="cpu")
    assert enc.snapshot.path == moved.resolve() and enc.preprocess.size == 32


def test_random_with_a_folder_copies_its_architecture_not_its_weights(pretrained_run):
    folder = encoder_dir(pretrained_run, "kneessl")
    images = np.random.default_rng(0).random((2, 32, 32), dtype=np.float32)
    rnd = create_encoder("random", folder, precision="fp32", device="cpu")
    ssl = create_encoder("kneessl", folder, precision="fp32", device="cpu")
    assert rnd.preprocess.size == 32 and rnd.checksum != ssl.checksum
    assert not np.allclose(rnd.encode(images), ssl.encode(images))


# --- resume and time cap ---------------------------------------------------------------------------------------------

def test_pretrain_resumes_after_a_kill_and_ends_where_an_uninterrupted_run_ends(tiny_run, tmp_path, monkeypatch,
                                                                               caplog):
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(tiny_run, twin)
    cfg = _cfg(checkpoint_every_s=0.0, max_minutes=1e6)  # epochs, not the clock, set the schedule
    pretrain.run(twin, cfg, progress=False)  # uninterrupted reference

    method = pretrain.METHODS.get("simclr")
    calls = {"n": 0}

    def dies_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process is killed during step 3
        return method.step(*args, **kwargs)

    monkeypatch.setitem(pretrain.METHODS._entries, "simclr", pretrain.Method(method.build, dies_on_third, method.title))
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(tiny_run, cfg, progress=False)
    state = torch.load(pretrain_state_path(tiny_run), weights_only=False)
    assert state["step"] == 2 and len(state["history"]) == 2
    monkeypatch.undo()
    with caplog.at_level("INFO", logger="kneeoa.stages.pretrain"):
        pretrain.run(tiny_run, cfg, progress=False)
    assert "Resuming pretraining" in caplog.text and "step 2 of 4" in caplog.text
    info = json.loads((encoder_dir(tiny_run, "kneessl") / "config.json").read_text())
    assert info["steps"] == 4 and info["attempts"] == 2
    from safetensors.torch import load_file

    resumed = load_file(str(encoder_dir(tiny_run, "kneessl") / "model.safetensors"))
    reference = load_file(str(encoder_dir(twin, "kneessl") / "model.safetensors"))
    for k, v in reference.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-4, atol=1e-5)


def test_pretrain_state_from_other_settings_is_not_resumed(tiny_run, monkeypatch, caplog):
    cfg = _cfg(checkpoint_every_s=0.0)
    method = pretrain.METHODS.get("simclr")

    calls = {"n": 0}

    def dies_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return method.step(*args, **kwargs)

    monkeypatch.setitem(pretrain.METHODS._entries, "simclr", pretrain.Method(method.build, dies_on_second,
                                                                             method.title))
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(tiny_run, cfg, progress=False)
    assert pretrain_state_path(tiny_run).exists()
    monkeypatch.undo()
    with caplog.at_level("INFO", logger="kneeoa.stages.pretrain"):
        pretrain.run(tiny_run, _cfg(temperature=0.5), progress=False)
    assert "other settings" in caplog.text and "Resuming" not in caplog.text


def test_time_cap_ends_training_and_is_recorded(tiny_run):
    pretrain.run(tiny_run, _cfg(epochs=1000), minutes=0.0, progress=False)
    info = json.loads((encoder_dir(tiny_run, "kneessl") / "config.json").read_text())
    assert info["stopped_by"] == "time cap" and info["steps"] == 0 and info["max_minutes"] == 0.0


# --- CNN starting weights ------------------------------------------------------------------------------------------

def test_cnn_pretrained_accepts_the_encoder_folder(pretrained_run):
    folder = encoder_dir(pretrained_run, "kneessl")
    source, text = resolve_pretrained(BACKBONES.get("twobranch"), str(folder), None)
    assert source == str(folder / "model.safetensors")
    assert "encoder folder" in text and "simclr" in text and "16 images" in text


def test_cnn_pretrained_refuses_an_encoder_of_another_backbone(pretrained_run):
    with pytest.raises(ConfigError, match="holds a 'twobranch' backbone"):
        resolve_pretrained(BACKBONES.get("resnet18"), str(encoder_dir(pretrained_run, "kneessl")), None)


# --- bad inputs -----------------------------------------------------------------------------------------------------

def test_embed_kneessl_without_a_pretrained_encoder_names_the_command(tiny_run):
    with pytest.raises(WeightsNotFoundError, match="kneeoa pretrain RUN_DIR"):
        embed.embed_one(tiny_run, "kneessl", None, _cfg(), progress=False)
    result = CliRunner().invoke(app, ["embed", str(tiny_run), "--encoder", "kneessl"])
    assert result.exit_code == 2 and "kneeoa pretrain" in result.output


def test_kneessl_with_no_folder_at_all_names_the_command():
    with pytest.raises(WeightsNotFoundError, match="kneeoa pretrain RUN_DIR"):
        create_encoder("kneessl", None, precision="fp32", device="cpu")


def test_encoder_folder_with_an_incomplete_config_is_refused(pretrained_run):
    folder = encoder_dir(pretrained_run, "kneessl")
    info = json.loads((folder / "config.json").read_text())
    del info["feature_dim"]
    (folder / "config.json").write_text(json.dumps(info))
    with pytest.raises(WeightsNotFoundError, match="lacks feature_dim"):
        create_encoder("kneessl", folder, precision="fp32", device="cpu")


def test_encoder_weights_of_another_architecture_are_refused(pretrained_run):
    from safetensors.torch import save_file

    folder = encoder_dir(pretrained_run, "kneessl")
    save_file({"other.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    with pytest.raises(WeightsNotFoundError, match="does not hold the parameters"):
        create_encoder("kneessl", folder, precision="fp32", device="cpu")


def test_missing_extra_folder_is_a_config_error(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="extra_dirs: folder .*nowhere does not exist"):
        pretrain.run(tiny_run, _cfg(extra_dirs=[str(tmp_path / "nowhere")]), progress=False)


def test_extra_folders_add_their_images(tiny_run, tmp_path):
    from kneeoa.formats.images import save_gray16

    extra = tmp_path / "unlabelled" / "deeper"
    for i in range(3):
        save_gray16(np.full((40, 40), 0.1 * (i + 1)), extra / f"knee{i}.png")
    rows = pretrain.pretrain_images(tiny_run, _cfg(extra_dirs=[str(tmp_path / "unlabelled")]).pretrain)
    assert len(rows) == 19 and rows["image_id"].str.startswith("extra:").sum() == 3


def test_no_images_in_the_chosen_splits_is_a_data_error(tiny_run):
    with pytest.raises(DataError, match="at least 2 images"):
        pretrain.run(tiny_run, _cfg(splits=["nosuchsplit"]), progress=False)


def test_models_list_shows_the_run_encoders(pretrained_run):
    result = CliRunner().invoke(app, ["models", "list", "--run", str(pretrained_run)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "kneessl" in result.output and "simclr" in result.output


def test_pretrain_command_refuses_a_run_without_manifest(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["pretrain", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "manifest" in result.output


def test_bad_pretrain_settings_are_named_before_anything_runs():
    from kneeoa.config import config_from_dict
    from kneeoa.config_checks import config_problems

    problems = config_problems(config_from_dict({"pretrain": {"method": "simclear", "batch_size": 1,
                                                              "splits": ["tran"], "backbone": "resnet81"}}))
    assert "pretrain.method: 'simclear' is not one of: simclr. Did you mean 'simclr'?" in problems
    assert "pretrain.batch_size: 1 is outside the allowed range [2, inf]." in problems
    assert any(p.startswith("pretrain.splits: 'tran'") for p in problems)
    assert any(p.startswith("pretrain.backbone: 'resnet81'") for p in problems)
