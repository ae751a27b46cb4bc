"""Stage `embed`: one vector per manifest image, provenance, resume after a crash, restart on a new model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import kneeoa.stages.embed as embed
from kneeoa.config import Config
from kneeoa.models.encoders.foundation import create_encoder
from kneeoa.runfolder.arms import read_arms
from kneeoa.runfolder.embeddings import embedding_matrix, read_embeddings
from kneeoa.sources.manifest import read_manifest
from standins import build_raddino


def _cfg(weights: dict, batch_size: int = 4) -> Config:
    cfg = Config()
    cfg.foundation.weights = {k: str(v) for k, v in weights.items()}
    cfg.foundation.batch_size = batch_size
    cfg.foundation.precision = "fp32"  # exact equality between a resumed and an uninterrupted run
    return cfg


class _Counting:
    """Wraps create_encoder: counts encode calls and fails on call `fail_at` (a killed run)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, *args, **kwargs):
        enc = create_encoder(*args, **kwargs)
        real = enc.encode

        def encode(images):
            self.calls += 1
            if self.calls == self.fail_at:
                raise KeyboardInterrupt("killed")
            return real(images)

        enc.encode = encode
        return enc


def test_embeds_every_image_with_provenance(tiny_run, standin_snapshots):
    for name in ("biomedclip", "rad-dino"):
        out = embed.embed_one(tiny_run, name, standin_snapshots[name], _cfg({}), progress=False)
        table, info = read_embeddings(tiny_run, name)
        manifest = read_manifest(tiny_run)
        assert out.exists() and list(table["image_id"]) == list(manifest["image_id"])
        assert embedding_matrix(table).shape == (len(manifest), info["dim"])
        assert info["model_id"] == create_encoder(name, standin_snapshots[name]).model_id
        assert info["preprocess"]["source"].endswith(("open_clip_config.json", "preprocessor_config.json"))
        assert len(info["checksum"]) == 64 and info["revision"] == "unknown"
        assert not out.with_suffix(".parts").exists()
    # vectors match a direct encoder pass on the same crop
    enc = create_encoder("rad-dino", standin_snapshots["rad-dino"], precision="fp32")
    from kneeoa.formats.images import load_gray

    first = load_gray(tiny_run / manifest["image_path"][0])
    np.testing.assert_allclose(embedding_matrix(table)[0], enc.encode(first[None])[0], rtol=1e-4, atol=1e-5)


def test_resume_skips_finished_shards_and_matches_an_uninterrupted_run(tiny_run, tmp_path, standin_snapshots,
                                                                       monkeypatch):
    cfg = _cfg({"rad-dino": standin_snapshots["rad-dino"]})
    n_batches = -(-len(read_manifest(tiny_run)) // 4)
    killer = _Counting(fail_at=3)
    monkeypatch.setattr(embed, "create_encoder", killer)
    with pytest.raises(KeyboardInterrupt):
        embed.embed_one(tiny_run, "rad-dino", None, cfg, progress=False)
    parts = tiny_run / "embeddings" / "rad-dino.parts"
    assert len(list(parts.glob("part-*.parquet"))) == 2 and (parts / "meta.json").exists()

    resumed = _Counting()
    monkeypatch.setattr(embed, "create_encoder", resumed)
    embed.embed_one(tiny_run, "rad-dino", None, cfg, progress=False)
    assert resumed.calls == n_batches - 2  # the two finished batches were not recomputed
    got = pd.read_parquet(tiny_run / "embeddings" / "rad-dino.parquet")

    fresh_run = shutil.copytree(tiny_run, tmp_path / "fresh")
    shutil.rmtree(fresh_run / "embeddings")
    embed.embed_one(fresh_run, "rad-dino", None, cfg, progress=False)
    want = pd.read_parquet(fresh_run / "embeddings" / "rad-dino.parquet")
    pd.testing.assert_frame_equal(got, want, rtol=1e-5)

    again = _Counting()
    monkeypatch.setattr(embed, "create_encoder", again)
    embed.embed_one(tiny_run, "rad-dino", None, cfg, progress=False)
    assert again.calls == 0  # up to date: nothing to do


def test_a_changed_model_restarts_cleanly(tiny_run, tmp_path, monkeypatch):
    weights = build_raddino(tmp_path / "rd", seed=0)
    cfg = _cfg({"rad-dino": weights})
    monkeypatch.setattr(embed, "create_encoder", _Counting(fail_at=3))
    with pytest.raises(KeyboardInterrupt):
        embed.embed_one(tiny_run, "rad-dino", None, cfg, progress=False)
    old_meta = json.loads((tiny_run / "embeddings" / "rad-dino.parts" / "meta.json").read_text())
    build_raddino(weights, seed=1)  # new weights in the same folder: another checksum
    counter = _Counting()
    monkeypatch.setattr(embed, "create_encoder", counter)
    with pytest.warns(UserWarning, match="made by another model.*checksum.*discarding its shards"):
        embed.embed_one(tiny_run, "rad-dino", None, cfg, progress=False)
    assert counter.calls == -(-len(read_manifest(tiny_run)) // 4)  # everything recomputed
    table, info = read_embeddings(tiny_run, "rad-dino")
    assert info["checksum"] != old_meta["checksum"]
    enc = create_encoder("rad-dino", weights, precision="fp32")
    from kneeoa.formats.images import load_gray

    last = load_gray(tiny_run / read_manifest(tiny_run)["image_path"].iloc[-1])
    np.testing.assert_allclose(embedding_matrix(table)[-1], enc.encode(last[None])[0], rtol=1e-4, atol=1e-5)


def test_run_records_missing_weights_and_goes_on(tiny_run, tmp_path, standin_snapshots):
    cfg = _cfg({"rad-dino": tmp_path / "missing", "biomedclip": standin_snapshots["biomedclip"]})
    embed.run(tiny_run, cfg)
    arms = read_arms(tiny_run)
    for arm in ("raddino_xgb", "raddino_linear"):
        assert arms[arm]["status"] == "not_run" and "microsoft/rad-dino" in arms[arm]["reason"]
    assert (tiny_run / "embeddings" / "biomedclip.parquet").exists()
    assert not (tiny_run / "embeddings" / "rad-dino.parquet").exists()


def test_embed_command(tiny_run, tmp_path, standin_snapshots):
    from typer.testing import CliRunner

    from kneeoa.cli.app import app

    runner = CliRunner()
    res = runner.invoke(app, ["embed", str(tiny_run), "--encoder", "rad-dino", "--weights",
                              str(standin_snapshots["rad-dino"])])
    assert res.exit_code == 0, res.output
    assert (tiny_run / "embeddings" / "rad-dino.parquet").exists()
    res = runner.invoke(app, ["embed", str(tiny_run), "--encoder", "rad-dino", "--weights", str(tmp_path / "none")])
    assert res.exit_code == 2 and "microsoft/rad-dino" in res.output
