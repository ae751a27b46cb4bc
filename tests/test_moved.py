"""Old import paths of moved modules still import the one module at its new place, with a DeprecationWarning."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest

from kneeoa.moved import MOVED, MovedModuleFinder, new_name


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_old_path_points_at_a_module_that_exists(old):
    assert importlib.util.find_spec(MOVED[old]) is not None, f"{old} -> {MOVED[old]}, which does not exist"
    assert old not in MOVED.values()


def test_an_old_path_is_the_same_module_object_and_warns():
    sys.modules.pop("kneeoa.data.dicom", None)
    with pytest.warns(DeprecationWarning, match="kneeoa.formats.dicom"):
        old = importlib.import_module("kneeoa.data.dicom")
    assert old is importlib.import_module("kneeoa.formats.dicom")


def test_a_submodule_under_an_old_package_path_is_not_loaded_twice():
    for name in ("kneeoa.data.phantom", "kneeoa.data.phantom.films"):
        sys.modules.pop(name, None)
    with pytest.warns(DeprecationWarning):
        old = importlib.import_module("kneeoa.data.phantom.films")
    assert old is importlib.import_module("kneeoa.synthetic.phantom.films")
    assert old.__name__ == "kneeoa.synthetic.phantom.films"


def test_the_finder_answers_only_for_old_paths():
    finder = MovedModuleFinder()
    assert finder.find_spec("kneeoa.formats.dicom") is None
    assert finder.find_spec("numpy") is None
    assert new_name("kneeoa.metrics") == "kneeoa.stats.metrics"
    assert new_name("kneeoa.metricsx") is None
    assert new_name("kneeoa.data.phantom.render") == "kneeoa.synthetic.phantom.render"
