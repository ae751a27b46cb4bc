import pandas as pd
import pytest

from kneeoa.errors import LeakageError, ManifestError
from kneeoa.sources.manifest import read_manifest, validate_manifest, write_manifest


def _rows(n=4):
    return pd.DataFrame({"image_id": [f"P{i // 2}_{'RL'[i % 2]}_V00" for i in range(n)],
                         "patient_id": [f"P{i // 2}" for i in range(n)], "visit": 0,
                         "side": ["R", "L"] * (n // 2), "image_path": [f"crops/{i}.png" for i in range(n)],
                         "split": ["train", "train", "test", "test"][:n], "low_quality": False, "source": "test",
                         "klg": [0, 1, 2, 4][:n]})


def test_valid_manifest_round_trips(tmp_path):
    write_manifest(_rows(), tmp_path)
    back = read_manifest(tmp_path)
    assert back["klg"].dtype == "Int64" and back["visit"].dtype == "int64"
    assert back["image_id"].tolist() == _rows()["image_id"].tolist()


@pytest.mark.parametrize("column, value, match", [
    ("klg", 7, r"row 2 \(image_id 'P1_R_V00'\): column 'klg' is 7; KL grades are whole numbers 0-4"),
    ("side", "X", r"row 2 .* column 'side' is 'X'"),
    ("split", "dev", r"column 'split' is 'dev'"),
    ("image_path", "", r"column 'image_path' is empty"),
    ("visit", "baseline", r"column 'visit' is 'baseline'"),
    ("os_fm", 4, r"column 'os_fm' is 4; OARSI grades"),
])
def test_errors_name_row_and_column(column, value, match):
    df = _rows()
    df[column] = df[column].astype(object) if column in df else None
    df.loc[2, column] = value
    with pytest.raises(ManifestError, match=match):
        validate_manifest(df)


def test_missing_columns_and_duplicate_ids():
    with pytest.raises(ManifestError, match=r"missing required column\(s\) \['split'\]"):
        validate_manifest(_rows().drop(columns="split"))
    df = _rows()
    df.loc[1, "image_id"] = df.loc[0, "image_id"]
    with pytest.raises(ManifestError, match="repeats an earlier row"):
        validate_manifest(df)


def test_patient_in_two_splits_is_a_hard_error(tmp_path):
    df = _rows()
    df.loc[1, "split"] = "val"
    with pytest.raises(LeakageError, match="patient 'P0' appears in splits") as err:
        validate_manifest(df)
    from kneeoa.cli.app import app

    command = str(err.value).split("re-run `kneeoa ")[1].split("`")[0]
    assert command == "prepare" and command in [g.name for g in app.registered_groups]  # a command that exists
    df.to_parquet(tmp_path / "manifest.parquet")  # whatever produced the file, reading it checks again
    with pytest.raises(LeakageError):
        read_manifest(tmp_path)


def test_missing_manifest_says_how_to_make_one(tmp_path):
    with pytest.raises(ManifestError, match="kneeoa phantom"):
        read_manifest(tmp_path)
