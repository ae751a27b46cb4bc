"""The registry: objects and lazy "module:attribute" entries behind one `get`, imported once and kept; unknown names,
double registrations, wrong kinds and misnamed entries refused with what to do."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from kneeoa.errors import ConfigError
from kneeoa.registry import Registry, resolve


@dataclass(frozen=True)
class Shape:
    name: str
    sides: int


@pytest.fixture
def lazy_module(tmp_path, monkeypatch):
    """A module `lazy_shapes` on sys.path that is not imported yet; forgotten again afterwards."""
    (tmp_path / "lazy_shapes.py").write_text(
        "from test_registry import Shape\n\nSQUARE = Shape('square', 4)\nNOT_A_SHAPE = 'four'\n"
        "MISNAMED = Shape('circle', 0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_shapes", raising=False)
    yield tmp_path / "lazy_shapes.py"
    sys.modules.pop("lazy_shapes", None)


def test_a_lazy_entry_is_imported_by_the_first_get_and_kept(lazy_module):
    shapes = Registry("shape", entry_type=Shape)
    shapes.add("triangle", Shape("triangle", 3))
    assert shapes.add("square", "lazy_shapes:SQUARE") == "lazy_shapes:SQUARE"
    assert "lazy_shapes" not in sys.modules  # adding, listing and testing membership import nothing
    assert shapes.names() == ["triangle", "square"] and "SQUARE" in shapes and list(shapes) == shapes.names()
    assert "lazy_shapes" not in sys.modules
    square = shapes.get("square")
    assert square == Shape("square", 4) and "lazy_shapes" in sys.modules
    lazy_module.write_text("raise RuntimeError('imported twice')\n")
    del sys.modules["lazy_shapes"]
    assert shapes.get("Square") is square  # kept: the module is not imported again
    assert shapes.items() == [("triangle", Shape("triangle", 3)), ("square", square)]


def test_resolve_names_an_object_by_module_and_attribute_path():
    assert resolve("kneeoa.registry:Registry.get") is Registry.get
    assert resolve(len) is len  # anything but a string is its own entry
    with pytest.raises(ModuleNotFoundError):
        resolve("kneeoa.no_such_module:X")


def test_unknown_names_list_the_valid_ones_and_the_nearest():
    shapes = Registry("shape")
    shapes.add("square", Shape("square", 4))
    shapes.add("triangle", Shape("triangle", 3))
    with pytest.raises(ConfigError, match=r"Unknown shape 'sqare'. Valid: square, triangle. Did you mean 'square'\?"):
        shapes.get("sqare")
    with pytest.raises(ConfigError, match=r"Unknown shape 'hexagon'. Valid: square, triangle.$"):
        shapes.remove("hexagon")
    with pytest.raises(ConfigError, match=r"Unknown colour 'red'. Valid: \(none\)."):
        Registry("colour").get("red")
    assert 4 not in shapes  # not a name at all


def test_a_name_is_registered_once_and_can_be_removed_and_reused():
    shapes = Registry("shape")
    shapes.add("square", Shape("square", 4))
    with pytest.raises(ValueError, match="shape 'square' is registered twice; pick another name"):
        shapes.add("SQUARE", "lazy_shapes:SQUARE")
    shapes.remove("Square")
    assert "square" not in shapes and shapes.names() == []
    shapes.add("square", Shape("square", 4))
    assert shapes.get("square").sides == 4


def test_entries_of_the_wrong_kind_or_name_are_refused(lazy_module):
    shapes = Registry("shape", entry_type=Shape)
    with pytest.raises(TypeError, match=r"shape 'four' is of type int, not a test_registry.Shape; register a "
                                        r"test_registry.Shape"):
        shapes.add("four", 4)
    with pytest.raises(TypeError, match="shape 'square' carries the name 'circle'; file it under 'circle' or rename"):
        shapes.add("square", Shape("circle", 0))
    with pytest.raises(ValueError, match="a string entry is a lazy 'module:attribute' reference; got 'square'"):
        shapes.add("square", "square")
    shapes.add("four", "lazy_shapes:NOT_A_SHAPE")
    shapes.add("square", "lazy_shapes:MISNAMED")
    with pytest.raises(TypeError, match=r"shape 'four' \(lazy_shapes:NOT_A_SHAPE\) is of type str, not a test_"):
        shapes.get("four")
    with pytest.raises(TypeError, match=r"shape 'square' \(lazy_shapes:MISNAMED\) carries the name 'circle'"):
        shapes.get("square")
    functions = Registry("function", entry_type=Callable)
    functions.add("len", len)
    with pytest.raises(TypeError, match="function 'one' is of type int, not a collections.abc.Callable"):
        functions.add("one", 1)


def test_a_registry_without_a_group_reads_no_entry_points():
    shapes = Registry("shape")
    shapes.reload_plugins()
    assert shapes.group is None and shapes.names() == []


def test_the_config_checks_name_each_registry_by_its_kind():
    from kneeoa.config_checks import CHECKS, REGISTRIES, OneOf

    assert all(REGISTRIES.get(kind).kind == kind for kind in REGISTRIES)
    named = {check.registry for check in CHECKS.values() if isinstance(check, OneOf) and check.registry}
    assert named <= set(REGISTRIES.names())
