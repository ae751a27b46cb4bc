import pandas as pd
import pytest

from kneeoa.errors import ConfigError
from kneeoa.tasks import TASKS, add_task_labels, available_tasks, get_task


def _grades(**kw):
    base = {c: 0 for c in ("os_fm", "os_fl", "os_tm", "os_tl", "jsn_m", "jsn_l", "sc_fm", "sc_fl", "sc_tm", "sc_tl")}
    base.update(kw)
    return base


def test_any_site_at_threshold_makes_the_feature_present():
    df = pd.DataFrame([_grades(), _grades(os_tl=1), _grades(jsn_m=2), _grades(sc_fm=3, os_fm=2)])
    out = add_task_labels(df)
    assert out["osteophytes"].tolist() == [0, 1, 0, 1]
    assert out["jsn"].tolist() == [0, 0, 1, 0]
    assert out["sclerosis"].tolist() == [0, 0, 0, 1]
    assert out["osteophytes_grade"].tolist() == [0, 1, 0, 2]


def test_threshold_is_a_config_option():
    df = pd.DataFrame([_grades(os_tl=1), _grades(os_tl=2)])
    assert add_task_labels(df, {"osteophytes": 2})["osteophytes"].tolist() == [0, 1]


def test_missing_grades_stay_missing_never_zero():
    df = pd.DataFrame([_grades(os_fm=None, os_fl=None, os_tm=None, os_tl=None),
                       _grades(os_fm=None, os_tl=2), _grades(os_fm=None)])
    out = add_task_labels(df)
    assert out["osteophytes"].isna().tolist() == [True, False, True]
    assert out["osteophytes"][1] == 1


def test_kl_only_data_lacks_the_oarsi_tasks():
    df = pd.DataFrame({"klg": [0, 3, 4]})
    out = add_task_labels(df)
    assert "osteophytes" not in out and "jsn" not in out
    assert available_tasks(out, ["klg", "osteophytes", "jsn"]) == ["klg"]


@pytest.mark.parametrize("bad, match", [({"klg": 1}, "not a binarised task"), ({"jsn": 5}, "must be 1, 2 or 3"),
                                        ({"jsnn": 1}, "Did you mean 'jsn'")])
def test_bad_thresholds(bad, match):
    with pytest.raises(ConfigError, match=match):
        add_task_labels(pd.DataFrame([_grades()]), bad)


def test_registry_entries_are_consistent():
    for name, task in TASKS.items():
        assert task.name == name
        assert task.kind in ("binary", "ordinal")
        assert (task.kind == "binary") == (task.n_classes == 2)
    assert get_task("klg").n_classes == 5
