"""The model-free knee check rules: DICOM tags before any pixel, then colour, size and flat pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kneeoa.errors import NotKneeError
from kneeoa.formats.dicom import write_dicom
from kneeoa.localize.films import FilmJob, load_film
from kneeoa.localize.knee_gate import file_reason, image_reason, tag_reason


@pytest.mark.parametrize(("tags", "words"), [
    ({"Modality": "CT"}, "Modality is 'CT'"),
    ({"Modality": "MR", "BodyPartExamined": "KNEE"}, "Modality is 'MR'"),
    ({"Modality": "RTDOSE"}, "not a projection radiograph"),
    ({"Modality": "DX", "BodyPartExamined": "CHEST"}, "BodyPartExamined is 'CHEST'"),
    ({"Modality": "CR", "BodyPartExamined": "KNEE", "ViewPosition": "LL"}, "ViewPosition is 'LL'"),
    ({"Modality": "DX", "ViewPosition": "LATERAL"}, "not a frontal"),
])
def test_tags_that_say_not_a_knee_are_refused(tags, words):
    assert words in (tag_reason(tags) or "")


@pytest.mark.parametrize("tags", [
    {}, {"Modality": "DX", "BodyPartExamined": "KNEE", "ViewPosition": "PA"}, {"Modality": "CR", "ViewPosition": "AP"},
    {"Modality": "OT"}, {"Modality": "dx", "BodyPartExamined": "lower limb"},
])
def test_knee_or_silent_tags_pass_to_the_image_check(tags):
    assert tag_reason(tags) is None


def test_pixel_rules():
    rng = np.random.default_rng(0)
    assert "32x40 px" in image_reason(rng.random((40, 32)))
    assert "flat image" in image_reason(np.full((100, 100), 0.4))
    assert image_reason(rng.random((100, 100))) is None


def test_colour_files_are_refused_and_grey_ones_not(tmp_path):
    rng = np.random.default_rng(0)
    colour = tmp_path / "photo.jpg"
    Image.fromarray((rng.random((80, 80, 3)) * 255).astype(np.uint8)).save(colour)
    grey_rgb = tmp_path / "grey.png"
    Image.fromarray(np.repeat((rng.random((80, 80, 1)) * 255).astype(np.uint8), 3, axis=2)).save(grey_rgb)
    assert "colour image" in file_reason(colour)
    assert file_reason(grey_rgb) is None


def test_load_film_refuses_by_tags_before_decoding(tmp_path):
    path = write_dicom(np.random.default_rng(0).random((200, 200)), tmp_path / "chest.dcm", spacing_mm=0.2,
                       body_part="CHEST")
    job = FilmJob(path=path, image_ids={"R": "a"}, kind="single", crops_dir=tmp_path / "crops", crop_mm=140.0,
                  image_size=64, localizer="profile")
    with pytest.raises(NotKneeError, match="BodyPartExamined is 'CHEST'"):
        load_film(job)
    image, spacing = load_film(FilmJob(path=path, image_ids={"R": "a"}, kind="single", crops_dir=tmp_path,
                                       crop_mm=140.0, image_size=64, localizer="profile", expect_knee=False))
    assert image.shape == (200, 200) and spacing == (0.2, 0.2)
