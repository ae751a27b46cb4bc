"""OAI importer: reading-table quirks, and the end-to-end import of a tiny phantom release against its truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kneeoa.config import Config
from kneeoa.errors import DataError
from kneeoa.formats.images import load_gray
from kneeoa.runfolder.manifest import import_target
from kneeoa.sources.manifest import validate_manifest
from kneeoa.sources.oai import VARIABLES, import_oai, parse_code, read_readings
from kneeoa.synthetic.phantom.films import read_truth, write_phantom_release


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    out = tmp_path_factory.mktemp("release")
    write_phantom_release(out, patients=3, visits=2, seed=0, spacings_mm=(0.5, 0.6), workers=1)
    return out


@pytest.fixture(scope="module")
def imported(release, tmp_path_factory):
    cfg = Config()
    cfg.data.image_size, cfg.data.workers = 64, 2
    run_dir = tmp_path_factory.mktemp("run")
    return import_oai(release, import_target(run_dir), cfg), run_dir


@pytest.mark.parametrize("value, expected", [
    ("2", 2.0), ("2: 2", 2.0), ("1: Definite", 1.0), (" 3 ", 3.0), (0.0, 0.0), ("", np.nan), (".", np.nan),
    (".M", np.nan), (".: Missing Form/Incomplete Workbook", np.nan), (".A: Not Expected", np.nan), (None, np.nan),
    ("abc", np.nan)])
def test_parse_code(value, expected):
    assert parse_code(value) == pytest.approx(expected, nan_ok=True)


def _table(tmp_path, rows: list[str], code: str = "00") -> None:
    header = "ID|SIDE|READPRJ|" + "|".join(f"V{code}{v}" for v in VARIABLES.values())
    (tmp_path / f"kXR_SQ_BU{code}.txt").write_text("\n".join([header, *rows]) + "\n")


def test_readprj_preference_and_missing_codes(tmp_path):
    grades = lambda g: "|".join([str(g)] * len(VARIABLES))  # noqa: E731
    _table(tmp_path, [
        f"9000001|1|42|{grades(3)}", f"9000001|1|15|{grades(1)}", f"9000001|1|37|{grades(2)}",  # 15 wins
        f"9000002|2: Left|42|{grades(3)}", f"9000002|2|37|{grades(2)}",  # 37 wins
        f"9000003|1|61|{grades(3)}", f"9000003|1|50|{grades(2)}",  # no preferred project: lowest (50)
        "9000004|1|15|.M|.: Missing Form/Incomplete Workbook|1: Definite|2: 2|0|0|0|0|0|0|9"])
    r = read_readings(tmp_path)
    t = r.table.set_index(["patient_id", "side"])
    assert t.loc[("9000001", "R"), "readprj"] == 15 and t.loc[("9000001", "R"), "klg"] == 1
    assert t.loc[("9000002", "L"), "readprj"] == 37 and t.loc[("9000002", "L"), "os_fm"] == 2
    assert t.loc[("9000003", "R"), "readprj"] == 50
    k4 = t.loc[("9000004", "R")]
    assert np.isnan(k4["klg"]) and np.isnan(k4["os_fm"]) and k4["os_fl"] == 1 and k4["os_tm"] == 2
    assert np.isnan(k4["sc_tl"])  # 9 is no OARSI grade: missing, and said so
    assert any("READPRJ 15 over 37" in n for n in r.notes) and any("37 over 42" in n for n in r.notes)
    assert any("V00XRSCTL outside 0-3" in n for n in r.notes)


def test_bad_side_is_quarantined(tmp_path):
    _table(tmp_path, ["9000001|3|15|" + "|".join(["0"] * len(VARIABLES))])
    r = read_readings(tmp_path)
    assert r.table.empty and "SIDE must be 1" in r.quarantine[0]["reason"]
    assert r.quarantine[0]["item"] == "kXR_SQ_BU00.txt line 2"


def test_table_without_required_columns(tmp_path):
    (tmp_path / "kXR_SQ_BU01.txt").write_text("ID|V01XRKL\n9000001|2\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['SIDE', 'READPRJ'\]"):
        read_readings(tmp_path)


def test_no_tables(tmp_path):
    with pytest.raises(DataError, match="No OAI reading tables"):
        import_oai(tmp_path, import_target(tmp_path / "run"), Config())


def test_rebuilds_phantom_truth_exactly(release, imported):
    result, run_dir = imported
    truth = read_truth(release)
    expected = truth[truth["has_film"] & truth["has_reading"]].set_index("image_id").sort_index()
    got = validate_manifest(result.manifest.assign(split="train")).set_index("image_id").sort_index()
    assert result.quarantine.empty
    assert list(got.index) == list(expected.index)
    for col in VARIABLES:
        pd.testing.assert_series_equal(got[col], expected[col], check_names=False)
    assert (got["patient_id"] == expected["patient_id"]).all() and (got["side"] == expected["side"]).all()
    assert (got["visit"] == expected["visit"]).all()
    err_mm = np.hypot(got["joint_row_px"] - expected["joint_row_px"],
                      got["joint_col_px"] - expected["joint_col_px"]) * expected["pixel_spacing_mm"]
    assert err_mm.max() < 5.0
    assert all(load_gray(run_dir / p).shape == (64, 64) for p in got["image_path"])


def test_unmatched_both_ways(release, imported):
    result, _ = imported
    truth = read_truth(release)
    unmatched = result.unmatched.set_index("item")["kind"]
    no_image = truth.loc[~truth["has_film"] & truth["has_reading"], "image_id"]
    no_reading = truth.loc[truth["has_film"] & ~truth["has_reading"], "image_id"]
    assert len(no_image) and len(no_reading)
    assert set(unmatched[unmatched == "reading_without_image"].index) == set(no_image)
    assert set(unmatched[unmatched == "image_without_reading"].index) == set(no_reading)


def test_notes_report_choices(imported):
    notes = "\n".join(imported[0].notes)
    assert "READPRJ 15 over 37" in notes and "READPRJ 37 over 42" in notes
    assert "ignored" in notes and "PA Right Hand" in notes


def test_film_that_cannot_be_read_is_quarantined(release, tmp_path):
    broken = tmp_path / "release"
    import shutil

    shutil.copytree(release, broken)
    film = broken / read_truth(release).query("has_film & has_reading")["film_path"].iloc[0]
    film.write_bytes(b"\0" * 50)
    cfg = Config()
    cfg.data.image_size, cfg.data.workers = 32, 1
    result = import_oai(broken, import_target(tmp_path / "run"), cfg)
    assert len(result.quarantine) == 1 and str(film) == result.quarantine["item"].iloc[0]
    assert "not a readable DICOM" in result.quarantine["reason"].iloc[0]
