"""What the wheel ships: every package-data pattern in pyproject.toml names files that exist."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_data_pattern_matches_a_file():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    where = ROOT / project["tool"]["setuptools"]["packages"]["find"]["where"][0]
    empty = [f"{package}: {pattern}" for package, patterns in project["tool"]["setuptools"]["package-data"].items()
             for pattern in patterns if not list((where / package.replace(".", "/")).glob(pattern))]
    assert not empty, f"package-data patterns that match no file (a folder that does not exist?): {empty}"
