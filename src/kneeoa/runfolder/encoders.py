"""RUN_DIR/encoders/<name>/ (owner: `pretrain`): encoders trained on the run's own images, and their resume state.

Each RUN_DIR/encoders/<name>/ is an encoder folder, whose files (weights, config.json, model card) are the model's
format (`kneeoa.models.cnn.encoder_folder`); `pretrain` adds its loss curve (`loss_curve.csv`, `loss_curve.png`).
RUN_DIR/pretrain/state.pt is the resume state of an unfinished pretraining run (weights, optimizer, elapsed time).
"""

from __future__ import annotations

from pathlib import Path

from kneeoa.models.cnn.encoder_folder import is_encoder_dir

ENCODERS_DIR = "encoders"
PRETRAIN_DIR = "pretrain"


def encoder_dir(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / ENCODERS_DIR / name


def pretrain_state_path(run_dir: Path) -> Path:
    return Path(run_dir) / PRETRAIN_DIR / "state.pt"


def list_encoder_dirs(run_dir: Path) -> list[Path]:
    """The encoder folders of a run, sorted by name."""
    root = Path(run_dir) / ENCODERS_DIR
    return sorted(p for p in root.glob("*") if is_encoder_dir(p)) if root.is_dir() else []
