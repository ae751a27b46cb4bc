"""How each model library builds an encoder from a snapshot folder (`LOADERS`: open_clip, transformers, and
kneeoa's own backbones: kneessl, random).

A loader returns the parts `create_encoder` assembles: the encoder class, the model, its forward function, the
preprocessing read from the snapshot's files, the embedding size and (CLIP) the tokenizer. Each library also says
where Grad-CAM hooks the models it builds (`CamHook`, read by `kneeoa.arms.encoder_cam`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kneeoa.errors import WeightsNotFoundError
from kneeoa.models.encoders.base import ClipEncoder, Encoder
from kneeoa.models.encoders.spec import EncoderSpec
from kneeoa.models.encoders.ssl import backbone_cam_layer, load_kneessl, load_random, locate_kneessl, locate_random
from kneeoa.models.hub import Snapshot, cached_file, first_existing, hub_offline
from kneeoa.registry import Registry
from kneeoa.transforms.preprocess import preprocess_from_hf, preprocess_from_open_clip


def _require(module: str, caller: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{caller} needs the '{module}' package: pip install "
                          f"{ {'open_clip': 'open_clip_torch'}.get(module, module)}") from e


def _text_tower_dir(snapshot: Path, text_cfg: dict[str, Any]) -> Path:
    """A folder holding the HF text tower's config.json: <snapshot>/text, else the HF cache, else the hub.

    open_clip builds the text tower with `AutoConfig.from_pretrained(text_cfg['hf_model_name'])` even when the CLIP
    checkpoint holds every weight, so offline that name must be a local folder with the BERT config.json.
    """
    name = text_cfg["hf_model_name"]
    local = first_existing(snapshot / "text", ["config.json"]) or first_existing(Path(name), ["config.json"])
    if local is None:
        local = cached_file(name, "config.json")
    if local is None and not hub_offline():
        from kneeoa.models.hub import fetch_file

        try:
            local = fetch_file(name, "config.json", snapshot / "text")
        except WeightsNotFoundError:
            local = None
    if local is None:
        raise WeightsNotFoundError(
            f"The text tower of {snapshot} needs the config.json of {name}, and it is not available offline. "
            f"Expected {snapshot / 'text' / 'config.json'} (or {name} in the HF cache). On a connected machine run "
            f"`huggingface-cli download {name} config.json --local-dir {snapshot / 'text'}` "
            "(`kneeoa models fetch biomedclip` does this too).")
    return local.parent.resolve()


def _load_open_clip(spec: EncoderSpec, snap: Snapshot, features: str, device: str) -> dict[str, Any]:
    open_clip = _require("open_clip", f"encoder '{spec.name}'")
    cfg_path = snap.path / spec.preprocess_file
    model_cfg = json.loads(cfg_path.read_text())["model_cfg"]
    text_cfg = dict(model_cfg["text_cfg"])
    text_cfg.update(hf_model_name=str(_text_tower_dir(snap.path, text_cfg)), hf_model_pretrained=False)
    model = open_clip.create_model_from_pretrained(f"local-dir:{snap.path}", device=device, return_transform=False,
                                                   text_cfg=text_cfg)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{snap.path}")
    pre = preprocess_from_open_clip(model.visual.preprocess_cfg, str(cfg_path))
    if features == "projected":
        forward, dim = model.encode_image, int(model_cfg["embed_dim"])
    else:  # pre_projection: the ViT's CLS token after the final norm, before the linear projection
        forward, dim = model.visual.trunk, int(model.visual.trunk.num_features)
    return {"cls": ClipEncoder, "model": model, "forward": forward, "preprocess": pre, "dim": dim,
            "tokenizer": tokenizer}


def _load_transformers(spec: EncoderSpec, snap: Snapshot, features: str, device: str) -> dict[str, Any]:
    transformers = _require("transformers", f"encoder '{spec.name}'")
    model = transformers.AutoModel.from_pretrained(snap.path, local_files_only=True).to(device)
    proc = transformers.AutoImageProcessor.from_pretrained(snap.path, local_files_only=True)
    pre = preprocess_from_hf(proc, str(snap.path / spec.preprocess_file))
    hidden = int(model.config.hidden_size)

    def cls(x: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=x).pooler_output

    def cls_mean_patch(x: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=x)
        return torch.cat([out.pooler_output, out.last_hidden_state[:, 1:].mean(dim=1)], dim=1)

    forward, dim = (cls, hidden) if features == "cls" else (cls_mean_patch, 2 * hidden)
    return {"cls": Encoder, "model": model, "forward": forward, "preprocess": pre, "dim": dim}


def _fetch_text_tower(snapshot: Path) -> None:
    """Put the text tower's config.json into <snapshot>/text, so the snapshot loads offline on its own."""
    from kneeoa.models.hub import fetch_file

    name = json.loads((snapshot / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]["hf_model_name"]
    fetch_file(name, "config.json", snapshot / "text")


def _square(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@dataclass(frozen=True)
class CamHook:
    """Where Grad-CAM looks inside the models a library builds.

    Attributes:
        layer: encoder -> the module whose output and gradients make the map. For a ViT, the last block's `norm1`
            (the usual choice): it feeds that block's attention, the last place where patch tokens reach the CLS
            token that leaves the model; after the block their gradients are zero.
        patch: encoder -> (height, width) of one patch, for a layer that outputs tokens: the map is then the patch
            grid of the model input (input size / patch size), prefix tokens dropped
            (`kneeoa.explain.cam.vit_reshape_transform`). None for a layer whose output is already an image-layout map
            (CNNs).
    """

    layer: Callable[[Encoder], torch.nn.Module]
    patch: Callable[[Encoder], tuple[int, int]] | None = None


@dataclass(frozen=True)
class Library:
    """How one model library builds an encoder from a snapshot, and what else a snapshot needs fetched.

    `locate` (spec, weights folder or None) -> Snapshot replaces the hub lookup for weights that never come from the
    hub (kneeoa's own encoders); a loader may return a "checksum" of weights that are not one file. `cam` says where
    Grad-CAM hooks its models (None: its encoders have no Grad-CAM).
    """

    load: Callable[..., dict[str, Any]]
    companions: Callable[[Path], None] | None = None
    locate: Callable[[EncoderSpec, str | Path | None], Snapshot] | None = None
    cam: CamHook | None = None


LOADERS: Registry[Library] = Registry("encoder library")
# open_clip wraps a timm ViT (`visual.trunk`); transformers' entry hooks the Dinov2 layout (RAD-DINO).
LOADERS.add("open_clip", Library(_load_open_clip, _fetch_text_tower, cam=CamHook(
    layer=lambda enc: enc.model.visual.trunk.blocks[-1].norm1,
    patch=lambda enc: _square(enc.model.visual.trunk.patch_embed.patch_size))))
LOADERS.add("transformers", Library(_load_transformers, cam=CamHook(
    layer=lambda enc: enc.model.encoder.layer[-1].norm1, patch=lambda enc: _square(enc.model.config.patch_size))))
LOADERS.add("kneessl", Library(load_kneessl, locate=locate_kneessl, cam=CamHook(backbone_cam_layer)))
LOADERS.add("random", Library(load_random, locate=locate_random, cam=CamHook(backbone_cam_layer)))
