"""Films composed from knee crops: true centres where the crops are, every kind of film, both on-disk layouts."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kneeoa.errors import DataError
from kneeoa.formats.dicom import read_dicom
from kneeoa.synthetic.crop_films import (
    VARIETY,
    compose_film,
    load_crop,
    read_truth,
    scan_crops,
    write_crop_films,
    write_crop_release,
)
from kneeoa.synthetic.phantom import render_spec, simulate_cohort

FAST = replace(VARIETY, spacing_mm=(0.8, 1.0))  # coarse films keep the tests fast


def phantom_crop_tree(root, patients: int = 4, split: str = "train"):
    """A kneeKL224-shaped tree of 224 px 8-bit crops rendered from phantom knees (centred on the joint)."""
    for spec in simulate_cohort(patients=patients, visits=1, seed=3, low_quality_share=0.0):
        knee = render_spec(spec, out_px=224, fov_mm=135.0)
        path = root / split / str(spec.grades.klg) / f"{9000000 + int(spec.patient_id[1:])}{spec.side}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(knee.image, 0, 1) * 255).astype(np.uint8)).save(path)
    return root


def test_scan_crops_reads_the_tree_and_refuses_an_empty_one(tmp_path):
    crops = scan_crops(phantom_crop_tree(tmp_path, patients=2), "train")
    assert len(crops) == 4 and set(crops["side"]) == {"R", "L"} and crops["patient_id"].str.len().eq(7).all()
    with pytest.raises(DataError, match="No knee crops .* in split 'val'"):
        scan_crops(tmp_path, "val")


def test_compose_film_puts_the_crop_centre_at_the_returned_centre():
    crop = np.full((224, 224), 0.4, np.float32)
    crop[107:117, 107:117] = 1.0  # a bright 6 mm square at the crop centre
    rng = np.random.default_rng(0)
    for single in (False, True):
        knees = {"R": (crop, "knee")} if single else {"R": (crop, "knee"), "L": (crop, "knee")}
        film, centres, props = compose_film(knees, spacing_mm=0.5, rng=rng, single=single)
        assert set(centres) == set(knees) and abs(props["rotation_deg_R"]) <= VARIETY.rotation_deg
        for r, c in centres.values():
            patch = film[int(r) - 2:int(r) + 3, int(c) - 2:int(c) + 3]
            assert patch.mean() > film[int(r) - 40:int(r) + 40, int(c) - 40:int(c) + 40].mean() + 0.05
    film, centres, _ = compose_film({"R": (crop, "knee"), "L": (crop, "missing")}, spacing_mm=0.5, rng=rng)
    assert centres["R"][1] < film.shape[1] / 2 < centres["L"][1]  # right knee on the image left


def test_write_crop_films_writes_readable_dicom_and_truth(tmp_path):
    crops = phantom_crop_tree(tmp_path / "kl", patients=5)
    variety = replace(FAST, single_share=0.2, missing_share=0.2, implant_share=0.2)
    truth = write_crop_films(crops, tmp_path / "set", split="train", seed=0, variety=variety)
    back = read_truth(tmp_path / "set")
    assert back[["film", "side", "content"]].equals(truth[["film", "side", "content"]])
    assert truth["film"].nunique() == 5 and set(truth["content"]) <= {"knee", "missing", "implant"}
    for film, g in truth.groupby("film"):
        dcm = read_dicom(film)
        assert dcm.image.shape == (g["rows"].iloc[0], g["cols"].iloc[0])
        assert dcm.pixel_spacing_mm == pytest.approx((g["spacing_mm"].iloc[0],) * 2)
        assert (g["kind"].iloc[0] == "single") == (len(g) == 1)


def test_read_truth_names_the_missing_file(tmp_path):
    with pytest.raises(DataError, match="truth.csv does not exist"):
        read_truth(tmp_path)


def test_crop_release_has_the_oai_layout(tmp_path):
    crops = phantom_crop_tree(tmp_path / "kl", patients=3)
    truth = write_crop_release(crops, tmp_path / "rel", split="train", seed=0, variety=FAST)
    assert (truth["kind"] == "bilateral").all() and truth["image_id"].str.match(r"^\d{7}_[RL]_V00$").all()
    contents = pd.read_csv(tmp_path / "rel" / "00m" / "contents.csv", dtype=str)
    assert all((tmp_path / "rel" / "00m" / f / "001").exists() for f in contents["Folder"])
    table = pd.read_csv(tmp_path / "rel" / "kXR_SQ_BU00.txt", sep="|", dtype=str)
    assert len(table) == len(truth) and set(table["V00XRKL"]) <= set("01234")


def test_inverted_crops_are_restored_bone_bright(tmp_path):
    crops = phantom_crop_tree(tmp_path, patients=1)
    path = scan_crops(crops, "train")["path"].iloc[0]
    plain = load_crop(path)
    Image.fromarray(((1 - plain) * 255).round().astype(np.uint8)).save(tmp_path / "inverted.png")
    assert np.allclose(load_crop(tmp_path / "inverted.png"), plain, atol=1 / 255 + 1e-6)


def test_crop_films_refuses_an_unknown_exposure_range(tmp_path):
    from typer.testing import CliRunner

    from kneeoa.cli.app import app

    res = CliRunner().invoke(app, ["crop-films", str(tmp_path), str(tmp_path / "out"), "--exposure", "harsh"])
    assert res.exit_code == 2 and "--exposure is 'harsh'; expected one of standard, wide" in res.output
    assert not (tmp_path / "out").exists()
