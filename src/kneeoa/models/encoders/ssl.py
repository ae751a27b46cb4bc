"""Encoders built from kneeoa's own CNN backbones (`LOADERS` entries `kneessl` and `random`).

- `kneessl`: an encoder folder written by `kneeoa pretrain` (`kneeoa.models.cnn.encoder_folder`): the backbone is
  built by its registered loader (`kneeoa.models.cnn.backbones.BACKBONES`) from `model.safetensors`, with the input
  size and normalisation of the folder's config.json.
- `random`: the same architecture with random weights drawn from a fixed seed, the control that tells what the
  pretraining added. Its architecture and input are the defaults of `pretrain` (`kneeoa.config.PretrainCfg`), or
  those of an encoder folder given as its weights (the folder's weights are then not loaded).

The embedding is the backbone's pooled feature vector (`num_features`), in eval mode. Encoder inputs arrive as three
channels (`kneeoa.transforms.preprocess`); the backbones take one, so the forward uses the first. Grad-CAM hooks the
backbone's own CAM layer (`backbone_cam_layer`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from kneeoa.config import PretrainCfg
from kneeoa.errors import WeightsNotFoundError
from kneeoa.models.cnn.encoder_folder import CONFIG_FILE, WEIGHTS_FILE, is_encoder_dir, read_encoder_config
from kneeoa.models.encoders.base import Encoder
from kneeoa.models.encoders.spec import EncoderSpec
from kneeoa.models.hub import Snapshot
from kneeoa.transforms.preprocess import Preprocess

RANDOM_SEED = 0


def _default_config() -> dict[str, Any]:
    """The architecture and input of a `pretrain` run with default settings (what `random` builds without a folder)."""
    from kneeoa.models.cnn.backbones import create_backbone, norm_stats

    pc = PretrainCfg()
    net, _ = create_backbone(pc.backbone, source=None, in_chans=1)
    mean, std = norm_stats(net)
    return {"backbone": pc.backbone, "image_size": pc.image_size, "mean": mean, "std": std,
            "feature_dim": int(net.num_features), "in_chans": 1, "method": "none"}


def _config(folder: Path) -> dict[str, Any]:
    """An encoder folder's config.json, or the default `pretrain` architecture when `folder` is not one."""
    return read_encoder_config(folder) if is_encoder_dir(folder) else _default_config()


def locate_kneessl(spec: EncoderSpec, weights: str | Path | None) -> Snapshot:
    """The encoder folder `weights` (the embed stage passes RUN_DIR/encoders/kneessl by default).

    Raises:
        WeightsNotFoundError: no folder given, or one without weights and config; names `kneeoa pretrain`.
    """
    if weights is None:
        raise WeightsNotFoundError(f"Encoder '{spec.name}' needs an encoder folder: run `kneeoa pretrain RUN_DIR` "
                                   "(it writes RUN_DIR/encoders/kneessl/), or pass --weights DIR.")
    folder = Path(weights).expanduser()
    info = read_encoder_config(folder)
    return Snapshot(folder.resolve(), "local folder", str(info.get("created", "unknown")))


def locate_random(spec: EncoderSpec, weights: str | Path | None) -> Snapshot:
    """No weights: a placeholder snapshot, or the local encoder folder whose config.json gives the architecture (its
    weights are not loaded; the revision says "seed-0" either way)."""
    if weights is None:
        return Snapshot(Path(f"random-init-seed{RANDOM_SEED}"), f"random init (seed {RANDOM_SEED})",
                        f"seed-{RANDOM_SEED}")
    folder = Path(weights).expanduser()
    read_encoder_config(folder)
    return Snapshot(folder.resolve(), "local folder", f"seed-{RANDOM_SEED}")


def _state_checksum(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _parts(model: torch.nn.Module, info: dict[str, Any], device: str, source: str) -> dict[str, Any]:
    """What `create_encoder` assembles: the eval-mode backbone, its pooled features, the preprocessing."""
    size = int(info["image_size"])
    pre = Preprocess(size, (size, size), (float(info["mean"]),) * 3, (float(info["std"]),) * 3, "bicubic", "squash",
                     source)
    model = model.to(device).eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x[:, :1])

    return {"cls": Encoder, "model": model, "forward": forward, "preprocess": pre, "dim": int(info["feature_dim"]),
            "checksum": _state_checksum(model)}


def load_kneessl(spec: EncoderSpec, snap: Snapshot, features: str, device: str) -> dict[str, Any]:
    """The pretrained backbone of an encoder folder, built by the backbone's own loader.

    Raises:
        WeightsNotFoundError: the weights file does not hold this backbone's parameters.
    """
    from safetensors.torch import load_file

    from kneeoa.models.cnn.backbones import create_backbone

    info = read_encoder_config(snap.path)
    weights = snap.path / WEIGHTS_FILE
    model, _ = create_backbone(info["backbone"], source=str(weights), in_chans=int(info["in_chans"]))
    stored, expected = set(load_file(str(weights))), set(model.state_dict())
    if stored != expected:
        missing, unexpected = sorted(expected - stored)[:3], sorted(stored - expected)[:3]
        raise WeightsNotFoundError(f"{weights} does not hold the parameters of backbone '{info['backbone']}' "
                                   f"(missing {missing}, unexpected {unexpected}). Rebuild it with "
                                   "`kneeoa pretrain RUN_DIR`.")
    return _parts(model, info, device, str(snap.path / CONFIG_FILE))


def load_random(spec: EncoderSpec, snap: Snapshot, features: str, device: str) -> dict[str, Any]:
    """The architecture of `pretrain` (or of the given folder) with weights drawn from `RANDOM_SEED`."""
    from kneeoa.models.cnn.backbones import create_backbone

    info = _config(snap.path)
    with torch.random.fork_rng():
        torch.manual_seed(RANDOM_SEED)
        model, _ = create_backbone(info["backbone"], source=None, in_chans=int(info["in_chans"]))
    return _parts(model, info, device, f"random init of {info['backbone']} (seed {RANDOM_SEED})")


def backbone_cam_layer(encoder: Encoder) -> torch.nn.Module:
    """The Grad-CAM layer of a kneessl or random encoder: its backbone's registered "last" CAM layer
    (`kneeoa.models.cnn.backbones.BACKBONES`), whose output is already in image layout."""
    from kneeoa.models.cnn.backbones import BACKBONES

    return BACKBONES.get(_config(encoder.snapshot.path)["backbone"]).cam_layers["last"](encoder.model)
