"""Grad-CAM figures (owner: `explain`): RUN_DIR/figures/gradcam/<arm>__<task>.png montages and index.json, which
lists the montages (`{"arm", "task", "file"}`, file relative to the run folder), the random maps' smoothing per
arm x task (`sigma_px`) and anything skipped, with why (`{"arm", "task", "reason"}`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kneeoa.io import atomic_path, write_json

GRADCAM_DIR = Path("figures") / "gradcam"
INDEX = "index.json"


def montage_file(arm: str, task: str) -> Path:
    """The montage's path relative to the run folder (as the index records it)."""
    return GRADCAM_DIR / f"{arm}__{task}.png"


def write_montage(fig, run_dir: Path, arm: str, task: str) -> Path:
    """Save a matplotlib figure as the arm x task montage, atomically; returns the path relative to the run folder."""
    rel = montage_file(arm, task)
    with atomic_path(Path(run_dir) / rel) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return rel


def write_index(index: dict[str, Any], run_dir: Path) -> Path:
    return write_json(index, Path(run_dir) / GRADCAM_DIR / INDEX)


def read_index(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / GRADCAM_DIR / INDEX
    return json.loads(path.read_text()) if path.exists() else None
