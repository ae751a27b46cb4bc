"""The built-in graders' folder: each subfolder holding a model.json is one model package shipped with kneeoa.

Only where they are and what they are called live here (no imports beyond the standard library), so config checks
can name them; loading and rebuilding them is `kneeoa.deploy.builtin`.
"""

from __future__ import annotations

from pathlib import Path


def root() -> Path:
    """The folder holding the built-in packages (inside the installed kneeoa package)."""
    return Path(__file__).parent


def names() -> list[str]:
    """Names of the built-in graders shipped with this kneeoa (subfolders holding a model.json)."""
    return sorted(p.name for p in root().iterdir() if (p / "model.json").is_file())
