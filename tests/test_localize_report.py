"""Film overviews drawn at prepare time (a sample, plus every film with a knee not cropped) and their report section."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from kneeoa.config import Config
from kneeoa.formats.dicom import read_dicom, write_dicom
from kneeoa.localize.films import FilmJob, process_film, with_overviews
from kneeoa.report.localize_sections import localize_section
from kneeoa.runfolder.manifest import OVERVIEW_DIR, import_target
from kneeoa.sources.oai import import_oai
from kneeoa.synthetic.phantom.films import chest_film, read_truth, write_phantom_release


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A phantom release of 3 films whose last film has its image-right half blanked (left knee missing), imported."""
    release = tmp_path_factory.mktemp("release")
    truth = write_phantom_release(release, patients=3, visits=1, seed=4, spacings_mm=(0.5,), workers=1)
    films = sorted(truth.loc[truth["has_film"], "film_path"].unique())
    blanked = release / films[-1]
    dcm = read_dicom(blanked)
    image = dcm.image.copy()
    image[:, image.shape[1] // 2:] = np.percentile(image, 2)
    write_dicom(image, blanked, spacing_mm=dcm.pixel_spacing_mm[0])
    cfg = Config()
    cfg.data.image_size = 64
    run_dir = tmp_path_factory.mktemp("run")
    return import_oai(release, import_target(run_dir), cfg), run_dir, cfg, read_truth(release)


def test_prepare_draws_sampled_films_and_every_film_with_a_missed_knee(prepared):
    result, run_dir, _, truth = prepared
    drawn = sorted((run_dir / OVERVIEW_DIR).glob("*.png"))
    assert len(drawn) == truth["film_path"].nunique() == 3  # fewer films than the sample: all drawn
    infos = [json.loads(p.with_suffix(".json").read_text()) for p in drawn]
    missed = [i for i in infos if i["missed"]]
    assert len(missed) == 1 and set(missed[0]["missed"]) == {"L"} and set(missed[0]["found"]) == {"R"}
    assert "image-right half" in missed[0]["missed"]["L"]
    assert all(set(i["found"]) == set(i["image_ids"]) for i in infos if not i["missed"])
    assert Image.open(drawn[0]).size[0] == 800
    assert len(result.manifest) == sum(len(i["found"]) for i in infos)


def test_report_section_shows_the_overviews_with_their_reasons(prepared):
    _, run_dir, cfg, _ = prepared
    html = localize_section(run_dir, cfg)
    assert html.startswith("<h2>Knee localisation</h2>") and html.count("<img") == 3
    assert "2 film(s) of the sample had both knees cropped; 1 film(s) had a knee not cropped" in html
    assert "L not cropped: no knee in the image-right half" in html


def test_report_section_absent_without_overviews(tmp_path):
    assert localize_section(tmp_path, Config()) is None


def test_with_overviews_samples_evenly_and_draws_misses_of_the_rest(tmp_path):
    jobs = [FilmJob(tmp_path / f"{i}.dcm", {"R": f"{i}_R", "L": f"{i}_L"}, "bilateral", tmp_path, crop_mm=140.0,
                    image_size=64, localizer="profile") for i in range(20)]
    drawn = with_overviews(jobs, tmp_path / "o", sample=4)
    assert [j.overview.name for j in drawn[:2]] == ["0_R__0_L.png", "1_R__1_L.png"]
    assert [i for i, j in enumerate(drawn) if not j.overview_if_missed] == [0, 6, 13, 19]
    assert with_overviews([], tmp_path) == []


def test_a_film_refused_whole_is_drawn_with_its_reason(tmp_path):
    path = write_dicom(chest_film(0.5, np.random.default_rng(1)), tmp_path / "chest.dcm", spacing_mm=0.5)
    job = FilmJob(path, {"R": "c_R", "L": "c_L"}, "bilateral", tmp_path / "crops", crop_mm=140.0, image_size=64,
                  localizer="profile", overview=tmp_path / "o" / "chest.png")
    out = process_film(job)
    info = json.loads((tmp_path / "o" / "chest.json").read_text())
    assert out.reason and not out.crops and (tmp_path / "o" / "chest.png").exists()
    assert info["found"] == {} and info["missed"] == {"R": out.reason, "L": out.reason}
