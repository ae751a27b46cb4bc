import numpy as np
import pytest
from PIL import Image

from kneeoa.config import Config
from kneeoa.data.manifest import read_manifest
from kneeoa.errors import DataError
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
    with pytest.raises(DataError, match="No knee images found"):
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
