"""Knee localisation and crops: both knees found where they are, implausible films refused with a reason."""

from __future__ import annotations

import re

import numpy as np
import pytest

from kneeoa.errors import ConfigError
from kneeoa.formats.dicom import write_dicom
from kneeoa.formats.images import load_gray
from kneeoa.localize.core import LOCALIZERS, LocalizationError, crop_square_mm, localize_profile, pad_square
from kneeoa.localize.films import FilmJob, process_film, run_film_jobs
from kneeoa.synthetic.phantom.films import chest_film
from kneeoa.transforms.preprocess import orient
from synthetic_films import bilateral_film, single_film

SP = 0.5


def test_bilateral_centres_within_two_mm():
    centres = ((200.0, 110.0), (215.0, 300.0))
    knees = localize_profile(bilateral_film(SP, centres), (SP, SP), knees=2)
    assert len(knees) == 2 and knees[0].col_px < knees[1].col_px
    for k, (r, c) in zip(knees, centres, strict=True):
        assert np.hypot(k.row_px * SP - r, k.col_px * SP - c) < 2.0
        assert k.score > 0.3


def test_anisotropic_spacing_is_physical():
    film = bilateral_film(SP)
    squeezed = film[:, ::2]  # columns now 1.0 mm apart
    (a, b), (c, d) = localize_profile(film, (SP, SP), knees=2), localize_profile(squeezed, (SP, 2 * SP), knees=2)
    assert abs(a.col_px * SP - c.col_px * 2 * SP) < 2 and abs(b.row_px * SP - d.row_px * SP) < 2


def test_single_knee():
    (k,) = localize_profile(single_film(SP, (140.0, 90.0)), (SP, SP), knees=1)
    assert np.hypot(k.row_px * SP - 140, k.col_px * SP - 90) < 2


def test_one_leg_only_is_refused():
    film = bilateral_film(SP, centers_mm=((200.0, 110.0),))
    with pytest.raises(LocalizationError, match="no leg found in the image-right half"):
        localize_profile(film, (SP, SP), knees=2)


def test_implausible_height_difference_is_refused():
    film = bilateral_film(SP, centers_mm=((120.0, 110.0), (280.0, 300.0)))
    with pytest.raises(LocalizationError, match="differ by .* mm in height"):
        localize_profile(film, (SP, SP), knees=2)


def test_knees_too_close_are_refused():
    film = bilateral_film(SP, centers_mm=((200.0, 150.0), (200.0, 255.0)), shape_mm=(400.0, 400.0))
    with pytest.raises(LocalizationError, match="apart; plausible"):
        localize_profile(film, (SP, SP), knees=2)


def test_chest_film_is_not_a_knee():
    film = chest_film(SP, np.random.default_rng(0))
    for knees in (1, 2):
        with pytest.raises(LocalizationError, match="no knee joint line|mm wide"):
            localize_profile(film, (SP, SP), knees=knees)


def test_low_contrast_film_is_refused():
    film = 0.5 + 0.02 * (bilateral_film(SP, noise=0.0) - 0.5)
    with pytest.raises(LocalizationError, match="low-contrast|no knee joint"):
        localize_profile(film, (SP, SP), knees=2)


def test_an_unknown_localizer_is_refused_with_the_nearest_name():
    with pytest.raises(ConfigError, match="Unknown localizer 'profil'.*Did you mean 'profile'"):
        LOCALIZERS.get("profil")


def test_crop_is_physical_and_padded():
    img = np.zeros((200, 300), np.float32)
    img[90:110, 140:160] = 1.0  # a 10 x 10 mm square at 0.5 mm spacing, centred at (100, 150) px
    crop = crop_square_mm(img, (SP, SP), (99.5, 149.5), crop_mm=40.0, size=40)
    assert crop[15:25, 15:25].mean() > 0.9 and crop[:12].max() < 0.1  # 1 mm pixels: the square spans 10 px
    edge = crop_square_mm(img, (SP, SP), (0.0, 0.0), crop_mm=40.0, size=40)
    assert edge[:18, :18].max() == 0  # outside the film is black


def test_pad_square_and_orient():
    img = np.tile(np.linspace(0, 1, 30, dtype=np.float32), (20, 1))
    out = pad_square(img, 16)
    assert out.shape == (16, 16) and out[0, 0] < out[0, -1]
    assert np.array_equal(orient(out, "L", mirror_left=True), out[:, ::-1])
    assert orient(out, "L", mirror_left=False) is out and orient(out, "R", mirror_left=True) is out


def _film_job(tmp_path, path, **kw):
    return FilmJob(path, kw.pop("ids", {"R": "p_R", "L": "p_L"}), kw.pop("kind", "bilateral"), tmp_path / "crops",
                   crop_mm=100.0, image_size=64, localizer="profile", **kw)


def test_process_film_writes_both_crops_in_orientation(tmp_path):
    path = write_dicom(bilateral_film(SP), tmp_path / "f.dcm", spacing_mm=SP, photometric="MONOCHROME1")
    mirrored = process_film(_film_job(tmp_path, path, mirror_left=True, ids={"L": "m_L"}))
    assert mirrored.reason is None and [c["side"] for c in mirrored.crops] == ["L"]
    plain = process_film(_film_job(tmp_path, path))
    assert plain.reason is None and [c["side"] for c in plain.crops] == ["R", "L"]
    assert plain.crops[0]["pixel_spacing_mm"] == pytest.approx(100 / 64)
    left = load_gray(tmp_path / "crops" / "p_L.png")
    assert np.allclose(load_gray(tmp_path / "crops" / "m_L.png"), left[:, ::-1], atol=1e-4)
    assert left[32, 32] < left[10, 32]  # the dark joint gap is at the centre, bone above it


def test_missing_spacing_quarantines_unless_configured(tmp_path):
    path = write_dicom(bilateral_film(SP), tmp_path / "f.dcm", spacing_mm=None)
    refused = process_film(_film_job(tmp_path, path))
    assert "no pixel spacing" in refused.reason and "default_spacing_mm" in refused.reason
    assert process_film(_film_job(tmp_path, path, default_spacing_mm=SP)).reason is None


def test_body_part_other_than_knee_is_refused(tmp_path):
    path = write_dicom(bilateral_film(SP), tmp_path / "f.dcm", spacing_mm=SP, body_part="CHEST")
    assert "BodyPartExamined is 'CHEST'" in process_film(_film_job(tmp_path, path)).reason


def test_untagged_chest_dicom_is_quarantined(tmp_path):
    path = write_dicom(chest_film(SP, np.random.default_rng(1)), tmp_path / "c.dcm", spacing_mm=SP, body_part="")
    assert re.search("no knee joint line|mm wide; a knee is", process_film(_film_job(tmp_path, path)).reason)


def test_corrupt_file_becomes_a_reason(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom")
    assert "bad.dcm" in process_film(_film_job(tmp_path, bad)).reason


def test_run_film_jobs_two_workers_keeps_order(tmp_path):
    paths = [write_dicom(single_film(SP, (140.0, 80.0 + 10 * i)), tmp_path / f"{i}.dcm", spacing_mm=SP)
             for i in range(3)]
    jobs = [_film_job(tmp_path, p, kind="single", ids={"L": f"k{i}"}) for i, p in enumerate(paths)]
    out = run_film_jobs(jobs, workers=2)
    assert [o.crops[0]["image_id"] for o in out] == ["k0", "k1", "k2"]
    assert [round(o.crops[0]["joint_col_px"] * SP / 10) for o in out] == [8, 9, 10]
