"""Knee localisation on films composed from real kneeKL224 val crops (slow; skipped without ../shared/data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kneeoa.config import Config
from kneeoa.localize.check import score_film_set
from kneeoa.synthetic.crop_films import write_crop_films, write_crop_release

KNEE_KL224 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "kneeKL224"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (KNEE_KL224 / "val").is_dir(), reason="../shared/data/kneeKL224 is absent")]


@pytest.fixture(scope="module")
def val_scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    write_crop_films(KNEE_KL224, root / "films", split="val", films=40, seed=11, workers=2)
    return score_film_set(root / "films", root / "crops", workers=2)


def test_val_films_knees_found_sides_right_absent_knees_refused(val_scored):
    knees = val_scored[val_scored["content"] == "knee"]
    assert (knees["verdict"] == "ok").mean() >= 0.95 and not val_scored["swapped"].any()
    assert (val_scored.loc[val_scored["content"] != "knee", "verdict"] == "refused").all()
    assert (val_scored.loc[~val_scored["found"], "reason"].str.len() > 0).all()


@pytest.mark.xfail(strict=True, reason="acceptance bar not met: ~2 % of real knees land 10-25 mm from their crop's "
                   "centre, along the leg; about half are crops framed off the joint (docs/localisation.md, "
                   "'Where the 10 mm bar stands')")
def test_val_films_no_knee_cropped_beyond_10_mm(val_scored):
    assert not (val_scored["verdict"] == "wrong").any()


def test_prepare_oai_recovers_every_knee_of_real_films(tmp_path):
    from kneeoa.runfolder.manifest import import_target
    from kneeoa.sources.oai import import_oai

    truth = write_crop_release(KNEE_KL224, tmp_path / "rel", split="val", films=12, seed=3, workers=2)
    cfg = Config()
    cfg.data.localizer = "heatmap"
    result = import_oai(tmp_path / "rel", import_target(tmp_path / "run"), cfg)
    knees = set(truth.loc[truth["content"] == "knee", "image_id"])
    assert set(result.manifest["image_id"]) == knees
    absent = truth.loc[truth["content"] != "knee", "image_id"]
    assert all(any(i in r for r in result.quarantine["reason"]) for i in absent)
