"""The learned heat-map localiser, per-knee quarantine, `kneeoa localize`, scoring and retraining."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from kneeoa.cli.app import app
from kneeoa.errors import ConfigError, DataError
from kneeoa.formats.dicom import write_dicom
from kneeoa.localize.check import score_film_set
from kneeoa.localize.core import LIMITS, KneesMissing, LocalizationError
from kneeoa.localize.films import FilmJob, process_film
from kneeoa.localize.heatmap import (
    WEIGHTS,
    KneeCandidate,
    installed_refiner,
    judge,
    knee_candidates,
    load_net,
    localize_heatmap,
)
from kneeoa.synthetic.crop_films import VARIETY, write_crop_films
from kneeoa.synthetic.phantom import simulate_cohort
from kneeoa.synthetic.phantom.films import chest_film, render_film
from test_crop_films import FAST, phantom_crop_tree

SP = 0.5


@pytest.fixture(scope="module")
def phantom_film():
    right, left = simulate_cohort(patients=1, visits=1, seed=5, low_quality_share=0.0)[:2]
    film, centres, px = render_film(right, left, spacing_mm=SP, rng=np.random.default_rng(5))
    return film, centres, px


def test_packaged_weights_are_small_and_load():
    assert WEIGHTS.exists() and WEIGHTS.stat().st_size < 1_000_000
    assert not load_net().training


def test_candidates_of_a_phantom_film(phantom_film):
    film, centres, px = phantom_film
    cands = knee_candidates(film, (px, px), knees=2)
    assert [k.where for k in cands] == ["image-left half", "image-right half"]
    for k, (r, c) in zip(cands, (centres["R"], centres["L"]), strict=True):
        assert np.hypot(k.row_px - r, k.col_px - c) * px < 5.0
        assert k.coarse > 0.5 and k.metal < 0.05
        if installed_refiner() is None:  # the coarse pass alone decides
            assert np.isnan(k.refined) and np.isnan(k.shift_mm) and k.confidence == k.coarse


def test_refining_pass_runs_with_given_weights(phantom_film, tmp_path):
    from kneeoa.localize.train import train_localizer

    weights = tmp_path / "refine.safetensors"
    train_localizer(phantom_crop_tree(tmp_path / "kl", patients=4), stage="refine", out=weights, films=6, epochs=1,
                    held_out=0.25)
    film, _, px = phantom_film
    for k in knee_candidates(film, (px, px), knees=2, refine_weights=weights):
        assert 0 <= k.refined <= 1 and k.shift_mm >= 0 and k.confidence == min(k.coarse, k.refined)


@pytest.mark.parametrize(("change", "message"), [
    ({"coarse": 0.1}, "no knee in the film (confidence 0.10 < "),
    ({"metal": 0.5, "coarse": 0.5}, "metal-like bright area over the knee in the film (50 % of the joint area"),
    ({"refined": 0.01}, "the knee joint in the film is not clear at 1 mm (refined confidence 0.01 < "),
    ({"shift_mm": 80.0}, "the two passes disagree on the knee in the film by 80 mm"),
])
def test_each_quarantine_rule_names_its_reason(change, message):
    knee = KneeCandidate("film", 100.0, 100.0, coarse=0.9, refined=0.9, shift_mm=2.0, metal=0.0)
    assert judge(knee) is None
    assert message in judge(replace(knee, **change))


def test_phantom_knees_within_five_mm(phantom_film):
    film, centres, px = phantom_film
    knees = localize_heatmap(film, (px, px), knees=2)
    for k, (r, c) in zip(knees, (centres["R"], centres["L"]), strict=True):
        assert np.hypot(k.row_px - r, k.col_px - c) * px < 5.0
        assert 0.5 <= k.confidence <= k.score <= 1.0


def test_chest_film_has_no_knees():
    with pytest.raises(KneesMissing, match="no knee in the image-left half .*no knee in the image-right half") as e:
        localize_heatmap(chest_film(SP, np.random.default_rng(0)), (SP, SP), knees=2)
    assert e.value.knees == [None, None]


def test_one_knee_missing_keeps_the_other(phantom_film, tmp_path):
    film, centres, px = phantom_film
    half = film.copy()
    half[:, film.shape[1] // 2:] = np.percentile(film, 2)
    with pytest.raises(KneesMissing) as e:
        localize_heatmap(half, (px, px), knees=2)
    assert e.value.knees[0] is not None and e.value.knees[1] is None
    assert e.value.reasons[0] is None and "image-right half" in e.value.reasons[1]
    path = write_dicom(half, tmp_path / "half.dcm", spacing_mm=px)
    out = process_film(FilmJob(path, {"R": "a_R", "L": "a_L"}, "bilateral", tmp_path / "crops", crop_mm=140.0,
                               image_size=224, localizer="heatmap"))
    assert [c["side"] for c in out.crops] == ["R"] and set(out.missed) == {"L"}
    assert out.reason.startswith("left knee not cropped: no knee in the image-right half")
    assert out.reason.endswith("(right knee cropped)") and 0.5 <= out.crops[0]["joint_confidence"] <= 1


def test_implausible_pairs_and_bad_arguments_are_refused(phantom_film, tmp_path):
    film, _, px = phantom_film
    with pytest.raises(LocalizationError, match="apart; plausible is 10-20 mm"):
        localize_heatmap(film, (px, px), knees=2, limits=replace(LIMITS, knee_distance_mm=(10.0, 20.0)))
    with pytest.raises(LocalizationError, match="differ by .* mm in height"):
        localize_heatmap(film, (px, px), knees=2, limits=replace(LIMITS, max_height_diff_mm=-1.0))
    with pytest.raises(LocalizationError, match="cannot look for 3 knees"):
        localize_heatmap(film, (px, px), knees=3)
    with pytest.raises(LocalizationError, match="weights .*nope.safetensors are missing.*localize-train"):
        localize_heatmap(film, (px, px), knees=2, weights=tmp_path / "nope.safetensors")
    with pytest.raises(LocalizationError, match="weights .*nope2.safetensors are missing.*localize-train"):
        localize_heatmap(film, (px, px), knees=2, refine_weights=tmp_path / "nope2.safetensors")


def test_localize_command_writes_crops_overviews_and_csv(phantom_film, tmp_path):
    film, _, px = phantom_film
    good = write_dicom(film, tmp_path / "good.dcm", spacing_mm=px, photometric="MONOCHROME1", encoding="rle")
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not a dicom")
    res = CliRunner().invoke(app, ["localize", str(good), str(bad), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "out" / "localize.csv")
    assert list(table.columns) == ["film", "side", "centre_x", "centre_y", "confidence", "status", "reason"]
    ok = table[table["film"] == str(good)]
    assert list(ok["side"]) == ["R", "L"] and (ok["status"] == "ok").all() and ok["centre_x"].is_monotonic_increasing
    refused = table[table["film"] == str(bad)]
    assert (refused["status"] == "quarantined").all() and refused["reason"].str.contains("bad.dcm").all()
    assert (tmp_path / "out" / "crops" / "good_R.png").exists() and (tmp_path / "out" / "crops" / "good_L.png").exists()
    assert Image.open(tmp_path / "out" / "overview" / "good.png").size[0] == 800


@pytest.mark.parametrize(("args", "message"), [
    (["--kind", "single"], "needs --side R or L"),
    (["--kind", "triple"], "kind must be 'bilateral' or 'single'"),
    (["--localizer", "profil"], "data.localizer: 'profil' is not one of"),
])
def test_localize_command_bad_options(tmp_path, args, message):
    film = tmp_path / "f.png"
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(film)
    res = CliRunner().invoke(app, ["localize", str(film), "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and message in res.output


def test_localize_command_refuses_duplicate_stems(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    res = CliRunner().invoke(app, ["localize", str(tmp_path / "a" / "f.dcm"), str(tmp_path / "b" / "f.dcm"),
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "share a file name stem" in res.output


def test_score_film_set_never_calls_a_missing_knee_ok(tmp_path):
    crops = phantom_crop_tree(tmp_path / "kl", patients=4)
    write_crop_films(crops, tmp_path / "set", split="train", seed=1,
                     variety=replace(FAST, missing_share=0.5, implant_share=0.0, single_share=0.0))
    scored = score_film_set(tmp_path / "set", tmp_path / "crops")
    assert set(scored["verdict"]) <= {"ok", "wrong", "quarantined", "refused"}
    assert not ((scored["content"] != "knee") & (scored["verdict"] == "ok")).any()
    assert (scored.loc[~scored["found"], "reason"].str.len() > 0).all()


@pytest.mark.parametrize("stage", ["coarse", "refine"])
def test_retraining_writes_loadable_weights(tmp_path, stage):
    from kneeoa.localize.train import train_localizer

    out = tmp_path / "w.safetensors"
    result = train_localizer(phantom_crop_tree(tmp_path / "kl", patients=4), stage=stage, out=out, films=8, epochs=1,
                             held_out=0.25)
    assert out.stat().st_size < 1_000_000 and np.isfinite(result["loss"])
    assert not load_net(out).training


def test_retraining_refuses_an_unknown_stage(tmp_path):
    from kneeoa.localize.train import train_localizer

    with pytest.raises(ConfigError, match="unknown localiser stage 'fine'; one of coarse, refine"):
        train_localizer(tmp_path, stage="fine")


def test_retraining_needs_enough_patients(tmp_path):
    from kneeoa.localize.train import train_localizer

    with pytest.raises(DataError, match="too few train patients"):
        train_localizer(phantom_crop_tree(tmp_path / "kl", patients=1), out=tmp_path / "w", films=4, epochs=1,
                        held_out=0.1)


def test_films_are_drawn_over_the_issues_spacing_and_rotation_ranges(tmp_path):
    """Films of the default variety are planned at 0.14-0.35 mm pixels and their legs turned up to 10 degrees either
    way, the ranges the issue asks for, drawn over the whole of each range."""
    from kneeoa.synthetic.crop_films import compose_film, plan_films

    crops = pd.DataFrame({"patient_id": [f"{i:04d}" for i in range(300) for _ in "RL"], "side": ["R", "L"] * 300,
                          "path": "knee.png"})
    spacings = np.array([plan.spacing_mm for plan in plan_films(crops, tmp_path, films=None, seed=0)])
    assert 0.14 <= spacings.min() < 0.15 and 0.34 < spacings.max() <= 0.35
    rng, crop = np.random.default_rng(0), np.full((64, 64), 0.5, np.float32)
    turns = np.array([[props[f"rotation_deg_{side}"] for side in "RL"] for _, _, props in (
        compose_film({"R": (crop, "knee"), "L": (crop, "knee")}, spacing_mm=2.0, rng=rng) for _ in range(30))])
    assert -10 <= turns.min() < -8 and 8 < turns.max() <= 10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crop_frame_offset_turns_a_film_offset_back_into_the_source_crop(seed):
    """A mark 20 mm below and 10 mm right of a crop's centre is found there again from its place on the film."""
    from kneeoa.localize.check import crop_frame_offset
    from kneeoa.synthetic.crop_films import compose_film

    crop = np.full((200, 200), 0.3, np.float32)  # 100 mm at 0.5 mm per pixel
    crop[139:142, 119:122] = 1.0  # centre of the mark: row 140, column 120
    variety = replace(VARIETY, crop_mm=(100.0, 100.0), rotation_deg=10.0, marker_share=0.0, collimation_share=0.0,
                      noise=(0.0, 0.0))
    rng = np.random.default_rng(seed)
    film, centres, props = compose_film({"R": (crop, "knee")}, spacing_mm=0.25, rng=rng, variety=variety,
                                        single=True)
    row, col = np.unravel_index(int(np.argmax(film)), film.shape)
    down, across = crop_frame_offset(row - centres["R"][0], col - centres["R"][1], props["rotation_deg_R"], 0.25)
    assert abs(props["rotation_deg_R"]) > 0.5  # the leg is turned, so a sign error would show
    assert down == pytest.approx(20.25, abs=0.6) and across == pytest.approx(10.25, abs=0.6)


def test_metal_share_is_measured_against_the_shafts():
    from kneeoa.localize.heatmap import metal_share

    film = np.full((400, 200), 0.3, np.float32)
    film[:, 60:140] = 0.7  # a leg of bone, joint centre at (200, 100)
    implant = film.copy()
    implant[180:220, 75:125] = 1.0  # metal at the joint only
    saturated = film.copy()
    saturated[:, 60:140] = 1.0  # the whole leg clipped to the brightest level
    assert metal_share(implant, (200, 100), 1.0) > 0.5
    assert metal_share(saturated, (200, 100), 1.0) == 0.0
    assert metal_share(film, (200, 100), 0.7) == 0.0


def test_wide_exposure_films_reach_underexposed_and_saturated(tmp_path):
    from kneeoa.synthetic.crop_films import VARIETY, WIDE_EXPOSURE, compose_film

    rng = np.random.default_rng(0)
    crop = np.clip(rng.normal(0.6, 0.1, (64, 64)), 0, 1).astype(np.float32)
    tops = []
    for variety in (VARIETY, WIDE_EXPOSURE):
        films = [compose_film({"R": (crop, "knee"), "L": (crop, "knee")}, spacing_mm=1.0, rng=rng, variety=variety)[0]
                 for _ in range(12)]
        tops.append([float((f >= 0.999).mean()) for f in films])
    assert max(tops[0]) < 0.01 < max(tops[1])  # only the wide range clips bone white
