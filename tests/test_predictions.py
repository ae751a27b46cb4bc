import numpy as np
import pytest

from kneeoa.errors import ManifestError
from kneeoa.runfolder.predictions import list_predictions, make_prediction_table, read_predictions, write_predictions


def _table(k=2, n=4):
    probs = np.full((n, k), 1 / k)
    return make_prediction_table([f"i{i}" for i in range(n)], ["test"] * n, np.arange(n) % k, probs)


def test_round_trip(tmp_path):
    path = write_predictions(_table(5, 6), tmp_path, "resnet18", "klg")
    assert path.name == "resnet18__klg.parquet" and list_predictions(tmp_path) == [path]
    arm, task, df = read_predictions(path)
    assert (arm, task) == ("resnet18", "klg")
    assert list(df.columns) == ["image_id", "split", "y_true", *[f"prob_{k}" for k in range(5)], "y_pred"]
    assert df["y_pred"].tolist() == [0] * 6  # argmax of equal probabilities


def test_contract_violations(tmp_path):
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['prob_2', 'prob_3', 'prob_4'\]"):
        write_predictions(_table(2), tmp_path, "a", "klg")
    bad = _table()
    bad.loc[1, "prob_0"] = 0.9
    with pytest.raises(ManifestError, match="row 1: probabilities"):
        write_predictions(bad, tmp_path, "a", "jsn")
    bad = _table()
    bad.loc[2, "y_true"] = 3
    with pytest.raises(ManifestError, match="row 2: column 'y_true' is 3; expected 0-1"):
        write_predictions(bad, tmp_path, "a", "jsn")
    bad = _table()
    bad.loc[3, "image_id"] = "i0"
    with pytest.raises(ManifestError, match="appears twice"):
        write_predictions(bad, tmp_path, "a", "jsn")
