import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kneeoa.config import Config
from kneeoa.errors import DataError
from kneeoa.sources.folders import parse_name
from kneeoa.sources.manifest import read_manifest
from kneeoa.stages.prepare import prepare


def _png(path, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, dtype=np.uint8)).save(path)


def _cfg():
    cfg = Config()
    cfg.data.source = "folders"
    return cfg


def test_split_folders_become_the_split(tmp_path):
    root = tmp_path / "kl"
    for split, pid, side, grade in [("train", "9001695", "L", 0), ("train", "9001695", "R", 2),
                                    ("val", "9003126", "L", 4), ("test", "9004315", "R", 1)]:
        _png(root / split / str(grade) / f"{pid}{side}.png")
    _png(root / "train" / "7" / "9000001L.png")  # not a grade
    _png(root / "train" / "1" / "9000002.png")  # no side
    df = prepare(tmp_path / "run", _cfg(), path=root)
    back = read_manifest(tmp_path / "run")
    assert len(back) == 4 and set(back["split"]) == {"train", "val", "test"}
    row = back.set_index("image_id").loc["9001695_R_V00"]
    assert (row["patient_id"], row["side"], row["klg"], row["split"]) == ("9001695", "R", 2, "train")
    assert "osteophytes" not in df  # KL-only data lacks the OARSI tasks
    rep = (tmp_path / "run" / "data_report.json").read_text()
    assert "is not a KL grade" in rep and "does not end in L or R" in rep


@pytest.mark.parametrize("stem, parsed", [
    ("9001695L", ("9001695", "L")), ("9001695_l", ("9001695", "L")), ("9001695-right", ("9001695", "R")),
    ("P12_R", ("P12", "R")), ("scan_original", None), ("scan_originaL", None), ("9001695", None),
    ("9001695l", None), ("L", None), ("9001695_x", None)])
def test_file_names_parse_or_are_refused(stem, parsed):
    assert parse_name(stem) == parsed


def test_every_file_is_used_quarantined_or_listed_as_skipped(tmp_path):
    root = tmp_path / "kl"
    _png(root / "train" / "0" / "9001L.png")
    _png(root / "train" / "2" / "9001R.png")
    _png(root / "valid" / "4" / "9003L.png")  # `valid` is val, as in the CSV importer
    _png(root / "train" / "1" / "scan_original.png")
    noisy = root / "train" / "1" / "9007L.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(noisy)
    noisy.write_bytes(noisy.read_bytes()[:2000])  # cut inside the pixel data
    (root / "train" / "3").mkdir()
    (root / "train" / "3" / "9008R.png").write_bytes(b"")
    (root / "train" / "notes.txt").write_text("readme")
    (root / "train" / ".DS_Store").write_bytes(b"\0")
    (root / "train" / "3" / "9009R.dcm").write_bytes(b"DICM")
    df = prepare(tmp_path / "run", _cfg(), path=root)
    assert sorted(df["image_id"]) == ["9001_L_V00", "9001_R_V00", "9003_L_V00"]
    assert dict(zip(df["patient_id"], df["split"], strict=False))["9003"] == "val"
    quarantine = pd.read_parquet(tmp_path / "run" / "quarantine.parquet").set_index("item")["reason"]
    assert "does not end in L or R" in quarantine[str(root / "train" / "1" / "scan_original.png")]
    assert "cannot be read as an image" in quarantine[str(root / "train" / "1" / "9007L.png")]
    assert "empty (0 bytes)" in quarantine[str(root / "train" / "3" / "9008R.png")]
    skipped = pd.read_parquet(tmp_path / "run" / "skipped.parquet").set_index("item")["reason"]
    assert set(skipped.index) == {str(root / "train" / n) for n in ("notes.txt", ".DS_Store", "3/9009R.dcm")}
    assert "suffix '.dcm'" in skipped[str(root / "train" / "3" / "9009R.dcm")]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["counts"]["quarantined"] == 3 and len(report["skipped"]) == 3


def test_split_folders_may_be_symbolic_links(tmp_path):
    real = tmp_path / "store"
    for split, pid in (("train", "9001"), ("val", "9002"), ("test", "9003")):
        _png(real / split / "1" / f"{pid}L.png")
        (tmp_path / "kl").mkdir(exist_ok=True)
        (tmp_path / "kl" / split).symlink_to(real / split, target_is_directory=True)
    df = prepare(tmp_path / "run", _cfg(), path=tmp_path / "kl")
    assert sorted(df["split"]) == ["test", "train", "val"]


def test_conflicting_duplicates_are_named(tmp_path):
    root = tmp_path / "kl"
    _png(root / "1" / "9001L.png")
    _png(root / "3" / "9001L.png")
    _png(root / "2" / "9002R.png")
    _png(root / "2" / "9003R.png")
    _png(root / "2" / "9004R.png")
    prepare(tmp_path / "run", _cfg(), path=root)
    reasons = set(pd.read_parquet(tmp_path / "run" / "quarantine.parquet")["reason"])
    assert reasons == {"the same patient and side appears more than once with conflicting KL grades (in two grade "
                       "or split folders)"}


def test_import_that_keeps_nothing_is_an_error_and_a_new_prepare_leaves_nothing_stale(tmp_path):
    root = tmp_path / "kl"
    _png(root / "1" / "9001L.png")
    (root / "1" / "9002L.png").write_bytes(b"")
    for i in range(3, 9):
        _png(root / "2" / f"900{i}R.png")
    run = tmp_path / "run"
    prepare(run, _cfg(), path=root)
    assert (run / "quarantine.parquet").exists()
    (root / "1" / "9002L.png").unlink()
    prepare(run, _cfg(), path=root)
    assert not (run / "quarantine.parquet").exists() and not (run / "skipped.parquet").exists()
    bad = tmp_path / "bad"
    (bad / "1").mkdir(parents=True)
    (bad / "1" / "9001L.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"No usable knee images under .* \(1 quarantined, 0 other file"):
        prepare(run, _cfg(), path=bad)


def test_without_split_folders_splits_are_made_by_patient(tmp_path):
    root = tmp_path / "kl"
    for i in range(30):
        for side in "LR":
            _png(root / str(i % 5) / f"{9000000 + i}{side}.png")
    df = prepare(tmp_path / "run", _cfg(), path=root)
    assert set(df["split"]) == {"train", "val", "test"}
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        prepare(tmp_path / "run", _cfg(), path=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No usable knee images under"):
        prepare(tmp_path / "run", _cfg(), path=tmp_path / "empty")


@pytest.mark.slow
def test_kneekl224_imports_with_its_published_counts(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "kneeKL224"
    if not root.exists():
        pytest.skip("../shared/data/kneeKL224 is not present")
    df = prepare(tmp_path / "run", _cfg(), path=root)
    assert df["split"].value_counts().to_dict() == {"train": 5778, "val": 826}
    assert df[df["split"] == "train"]["klg"].value_counts().sort_index().tolist() == [2286, 1046, 1516, 757, 173]
