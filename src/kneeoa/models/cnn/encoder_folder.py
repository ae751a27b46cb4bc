"""The encoder folder, as a file format: a headless CNN backbone's weights and the config that rebuilds it.

A folder holds `model.safetensors` (the backbone's state dict, loadable by the backbone's own loader and by
`cnn.pretrained: FOLDER`), `config.json` (`ENCODER_KEYS`: backbone, image size, normalisation, feature size,
channels, method; the writer may add provenance) and a `README.md` model card. `kneeoa pretrain` writes one
(`kneeoa.stages.pretrain`); the `kneessl` and `random` encoders (`kneeoa.models.encoders.ssl`) and the CNN arms'
starting weights (`kneeoa.models.cnn.backbones.resolve_pretrained`) read it. Where a run keeps its encoder folders
is the run folder's business (`kneeoa.runfolder.encoders`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kneeoa.errors import WeightsNotFoundError
from kneeoa.io import atomic_path, write_json

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
#: What an encoder folder's config.json must hold.
ENCODER_KEYS = ("backbone", "image_size", "mean", "std", "feature_dim", "in_chans", "method")


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


def write_encoder(folder: Path, backbone: torch.nn.Module, config: dict[str, Any]) -> Path:
    """Write a backbone's weights (safetensors, atomically), then its config.json, into `folder`; returns it.

    The config goes last, so a folder interrupted in between is not yet an encoder folder (`is_encoder_dir`).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().contiguous() for k, v in backbone.state_dict().items()}, str(tmp))
    write_json(config, folder / CONFIG_FILE)
    return folder
