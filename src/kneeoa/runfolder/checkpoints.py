"""CNN checkpoints (owner: `train`): RUN_DIR/checkpoints/<arm>/<group>.pt, group = "multitask" or a task name.

The payload format (weights, preprocessing, heads, decoding; `{"members": [...]}` for an ensemble) belongs to
`kneeoa.models.cnn.backbones`; this module names the files and lists which arms have them.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"


def checkpoint_path(run_dir: Path, arm: str, group: str) -> Path:
    """RUN_DIR/checkpoints/<arm>/<group>.pt."""
    return Path(run_dir) / CHECKPOINTS_DIR / arm / f"{group}.pt"


def arm_dir(run_dir: Path, arm: str) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / arm


def checkpoint_arms(run_dir: Path) -> list[str]:
    """The arms with at least one checkpoint file, sorted."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    return sorted(d.name for d in root.iterdir() if d.is_dir() and any(d.glob("*.pt"))) if root.exists() else []
