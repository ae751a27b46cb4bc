"""CSV importer: crops pass through, films are localised, every unusable row is quarantined by its line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kneeoa.config import Config
from kneeoa.errors import ConfigError, DataError
from kneeoa.formats.dicom import write_dicom
from kneeoa.formats.images import load_gray, save_gray16
from kneeoa.runfolder.manifest import import_target
from kneeoa.sources.csv_table import import_csv
from kneeoa.sources.manifest import validate_manifest
from synthetic_films import bilateral_film, single_film

SP = 0.5


def _cfg(**data) -> Config:
    """Import settings for the synthetic block films of `synthetic_films`: schematic bright bands, not radiographs,
    drawn for the classical `profile` localiser (the learned default is tested on real-knee and phantom films)."""
    cfg = Config()
    cfg.data.image_size, cfg.data.workers, cfg.data.localizer = 32, 1, "profile"
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


@pytest.fixture
def hospital(tmp_path):
    root = tmp_path / "hospital"
    save_gray16(np.tile(np.linspace(0, 1, 40), (30, 1)), root / "img" / "a_left.png")
    write_dicom(bilateral_film(SP), root / "films" / "b.dcm", spacing_mm=SP, photometric="MONOCHROME1")
    write_dicom(single_film(SP), root / "films" / "c.dcm", spacing_mm=SP, laterality="R")
    rows = [
        ("img/a_left.png", "A", "left", "0", "2", "1", "train"),
        ("films/b.dcm", "B", "R", "1", "3", "", "val"),
        ("films/b.dcm", "B", "L", "1", "0", "NA", "val"),
        ("films/c.dcm", "C", "right", "0", "", "0", "test"),
        ("img/missing.png", "D", "R", "0", "1", "1", "train"),
        ("img/a_left.png", "E", "middle", "0", "1", "1", "train"),
        ("img/a_left.png", "A", "L", "0", "1", "1", "train"),
    ]
    table = pd.DataFrame(rows, columns=["file", "patient", "side", "visit", "KL", "os_fm", "split"])
    path = root / "table.csv"
    table.to_csv(path, index=False)
    return path


def test_import_mixed_table(hospital, tmp_path):
    cfg = _cfg(csv_columns={"image_path": "file", "patient_id": "patient", "klg": "KL"})
    result = import_csv(hospital, import_target(tmp_path / "run"), cfg)
    m = validate_manifest(result.manifest).set_index("image_id")
    assert list(m.index) == ["A_L_V00", "B_L_V01", "B_R_V01", "C_R_V00"]
    assert list(m["klg"].astype("float").fillna(-1)) == [2, 0, 3, -1]
    assert m.loc["A_L_V00", "os_fm"] == 1 and pd.isna(m.loc["B_L_V01", "os_fm"]) and pd.isna(m.loc["B_R_V01", "os_fm"])
    assert list(m["split"]) == ["train", "val", "val", "test"] and (m["source"] == "csv").all()
    assert m.loc["B_R_V01", "pixel_spacing_mm"] == pytest.approx(140 / 32)
    assert m.loc["B_R_V01", "original_path"] == str(hospital.parent / "films" / "b.dcm")
    for p in m["image_path"]:
        assert load_gray(tmp_path / "run" / p).shape == (32, 32)
    reasons = dict(zip(result.quarantine["item"], result.quarantine["reason"], strict=True))
    assert "does not exist" in reasons["table.csv line 6"]
    assert "side must be R/L" in reasons["table.csv line 7"]
    assert "repeats line 2 with conflicting labels (klg 2 vs 1)" in reasons["table.csv line 8"]


def test_film_that_fails_localisation_names_its_lines(tmp_path):
    root = tmp_path / "h"
    write_dicom(np.full((200, 300), 0.5), root / "flat.dcm", spacing_mm=SP)
    pd.DataFrame({"image_path": ["flat.dcm", "flat.dcm"], "patient_id": ["F", "F"], "side": ["R", "L"]}).to_csv(
        root / "t.csv", index=False)
    result = import_csv(root / "t.csv", import_target(tmp_path / "run"), _cfg())
    assert result.manifest.empty
    assert result.quarantine["item"].iloc[0] == "t.csv line(s) 2, 3"
    assert "flat.dcm" in result.quarantine["reason"].iloc[0]


def test_single_film_listed_twice_is_refused(tmp_path):
    root = tmp_path / "h"
    write_dicom(single_film(SP), root / "s.dcm", spacing_mm=SP)
    pd.DataFrame({"image_path": ["s.dcm", "s.dcm"], "patient_id": ["S", "S"], "side": ["R", "L"],
                  "kind": ["single", "single"]}).to_csv(root / "t.csv", index=False)
    result = import_csv(root / "t.csv", import_target(tmp_path / "run"), _cfg())
    assert result.manifest.empty and len(result.quarantine) == 2
    assert "is a single image listed for 2 knees" in result.quarantine["reason"].iloc[0]


def test_missing_required_column(tmp_path):
    pd.DataFrame({"file": ["a.png"], "patient_id": ["A"], "side": ["R"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match=r"lacks image_path \(column 'image_path'\).*csv_columns"):
        import_csv(tmp_path / "t.csv", import_target(tmp_path / "run"), _cfg())


def test_unknown_mapping_and_kind(tmp_path):
    pd.DataFrame({"image_path": ["a.png"], "patient_id": ["A"], "side": ["R"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ConfigError, match="unknown manifest column.*'grade'"):
        import_csv(tmp_path / "t.csv", import_target(tmp_path / "run"), _cfg(csv_columns={"grade": "KL"}))
    with pytest.raises(ConfigError, match="data.csv_kind must be one of"):
        import_csv(tmp_path / "t.csv", import_target(tmp_path / "run"), _cfg(csv_kind="film"))


def test_missing_table(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        import_csv(tmp_path / "nope.csv", import_target(tmp_path / "run"), _cfg())


def _table(tmp_path, rows, columns=("image_path", "patient_id", "side", "klg")):
    """A CSV of `rows`; each row's image is written as `<patient>.png` (one crop per knee)."""
    rows = [(f"{r[1]}.png", *r[1:]) for r in rows]
    for r in rows:
        save_gray16(np.full((20, 20), 0.5), tmp_path / r[0])
    path = tmp_path / "t.csv"
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("value", ["2.5", "3.7", "5", "-1", "two"])
def test_labels_must_be_whole_grades_in_range_named_by_csv_line(tmp_path, value):
    path = _table(tmp_path, [("a.png", "A", "R", "1"), ("a.png", "B", "R", value)])
    with pytest.raises(DataError, match=rf"t.csv line 3: column 'klg' \(klg\) is '{value}'; labels must be whole "
                                        r"numbers 0-4 or blank"):
        import_csv(path, import_target(tmp_path / "run"), _cfg())


def test_blank_and_na_labels_are_missing(tmp_path):
    path = _table(tmp_path, [("a.png", "A", "R", ""), ("a.png", "B", "R", "NA"), ("a.png", "C", "R", "4")])
    m = import_csv(path, import_target(tmp_path / "run"), _cfg()).manifest.set_index("patient_id")
    assert pd.isna(m.loc["A", "klg"]) and pd.isna(m.loc["B", "klg"]) and m.loc["C", "klg"] == 4


def test_split_aliases_match_the_folder_importer(tmp_path):
    path = _table(tmp_path, [("a.png", "A", "R", "1", "valid"), ("a.png", "B", "R", "1", "Train"),
                             ("a.png", "C", "R", "1", "holdout")], columns=("image_path", "patient_id", "side", "klg",
                                                                           "split"))
    result = import_csv(path, import_target(tmp_path / "run"), _cfg())
    assert dict(zip(result.manifest["patient_id"], result.manifest["split"], strict=True)) == {"A": "val",
                                                                                                "B": "train"}
    assert "split 'holdout' is not one of train, val, valid" in result.quarantine["reason"].iloc[0]


def test_duplicate_rows_say_whether_their_labels_conflict(tmp_path):
    path = _table(tmp_path, [("a.png", "A", "R", "1"), ("a.png", "A", "R", "1"), ("a.png", "A", "R", "3")])
    pd.read_csv(path).assign(image_path=["A.png", "A2.png", "A3.png"]).to_csv(path, index=False)
    for name in ("A2.png", "A3.png"):
        save_gray16(np.full((20, 20), 0.5), tmp_path / name)
    reasons = import_csv(path, import_target(tmp_path / "run"), _cfg()).quarantine.set_index("item")["reason"]
    assert reasons["t.csv line 3"].endswith("repeats line 2 (same labels)")
    assert reasons["t.csv line 4"].endswith("repeats line 2 with conflicting labels (klg 1 vs 3)")
