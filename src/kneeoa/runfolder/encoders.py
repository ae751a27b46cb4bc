"""RUN_DIR/encoders/<name>/ (owner: `pretrain`): encoders trained on the run's own images, and their resume state.

An encoder folder holds `model.safetensors` (the headless backbone's state dict, loadable by the backbone's own
loader and by `cnn.pretrained: FOLDER`), `config.json` (`ENCODER_KEYS`: backbone, image size, normalisation,
feature size, method) and a `README.md` model card with the loss curve (`loss_curve.csv`, `loss_curve.png`).
RUN_DIR/pretrain/state.pt is the resume state of an unfinished pretraining run (weights, optimizer, elapsed time).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kneeoa.errors import WeightsNotFoundError

ENCODERS_DIR = "encoders"
PRETRAIN_DIR = "pretrain"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
#: What an encoder folder's config.json must hold.
ENCODER_KEYS = ("backbone", "image_size", "mean", "std", "feature_dim", "in_chans", "method")


def encoder_dir(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / ENCODERS_DIR / name


def pretrain_state_path(run_dir: Path) -> Path:
    return Path(run_dir) / PRETRAIN_DIR / "state.pt"


def is_encoder_dir(folder: Path) -> bool:
    """True for a folder holding an encoder's weights and config.json (what `cnn.pretrained` may name)."""
    folder = Path(folder)
    return (folder / WEIGHTS_FILE).is_file() and (folder / CONFIG_FILE).is_file()


def read_encoder_config(folder: Path, *, made_by: str = "kneeoa pretrain RUN_DIR") -> dict[str, Any]:
    """An encoder folder's config.json, checked for `ENCODER_KEYS`.

    Raises:
        WeightsNotFoundError: the folder, its weights or its config is missing, or a key is absent; names the
            command that makes the folder.
    """
    folder = Path(folder)
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE) if not (folder / f).is_file()]
    if missing:
        what = "does not exist" if not folder.is_dir() else f"lacks {', '.join(missing)}"
        raise WeightsNotFoundError(f"Encoder folder {folder} {what}. Make it with `{made_by}` (self-supervised "
                                   "pretraining on the run's images), or pass another encoder folder with --weights.")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    absent = [k for k in ENCODER_KEYS if k not in cfg]
    if absent:
        raise WeightsNotFoundError(f"{folder / CONFIG_FILE} lacks {', '.join(absent)}; it was not written by "
                                   f"`kneeoa pretrain`. Rebuild the encoder with `{made_by}`.")
    return cfg


def list_encoder_dirs(run_dir: Path) -> list[Path]:
    """The encoder folders of a run, sorted by name."""
    root = Path(run_dir) / ENCODERS_DIR
    return sorted(p for p in root.glob("*") if is_encoder_dir(p)) if root.is_dir() else []
