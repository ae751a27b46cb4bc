"""Knee localisation on films composed from real kneeKL224 val crops (slow; skipped without ../shared/data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kneeoa.config import Config
from kneeoa.data.crop_films import write_crop_films, write_crop_release
from kneeoa.data.localize_check import score_film_set

KNEE_KL224 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "kneeKL224"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (KNEE_KL224 / "val").is_dir(), reason="../shared/data/kneeKL224 is absent")]


def test_val_films_knees_found_and_never_cropped_wrong(tmp_path):
    write_crop_films(KNEE_KL224, tmp_path / "films", split="val", films=40, seed=11, workers=2)
    scored = score_film_set(tmp_path / "films", tmp_path / "crops", workers=2)
    knees = scored[scored["content"] == "knee"]
    assert (knees["verdict"] == "ok").mean() >= 0.95
    assert not (scored["verdict"] == "wrong").any() and not scored["swapped"].any()
    assert (scored.loc[~scored["found"], "reason"].str.len() > 0).all()


def test_prepare_oai_recovers_every_knee_of_real_films(tmp_path):
    from kneeoa.data.oai import import_oai

    truth = write_crop_release(KNEE_KL224, tmp_path / "rel", split="val", films=12, seed=3, workers=2)
    cfg = Config()
    cfg.data.localizer = "heatmap"
    result = import_oai(tmp_path / "rel", tmp_path / "run", cfg)
    knees = set(truth.loc[truth["content"] == "knee", "image_id"])
    assert set(result.manifest["image_id"]) == knees
    absent = truth.loc[truth["content"] != "knee", "image_id"]
    assert all(any(i in r for r in result.quarantine["reason"]) for i in absent)
