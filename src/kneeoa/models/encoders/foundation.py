"""Frozen foundation-model encoders (BiomedCLIP, RAD-DINO): grayscale knee crops in, one vector per image out.

An encoder entry is data: hub id, embedding sizes per feature choice, the snapshot file its preprocessing is read
from, licence and paper. `create_encoder` resolves the weights (explicit folder, HF cache, hub; see
`kneeoa.models.hub`), builds the model with the library that publishes it (open_clip or transformers) and reads the
resize / crop / normalisation settings from the snapshot's own files, so no mean or std is written here.

The parts live beside this registry: the entry type (`kneeoa.models.encoders.spec`), preprocessing
(`kneeoa.transforms.preprocess`), device and precision (`kneeoa.models.encoders.device`), the encoder objects
(`kneeoa.models.encoders.base`) and the library loaders (`kneeoa.models.encoders.loaders`). Adding an encoder is one
`EncoderSpec` entry here; the embedding table it fills belongs to the run folder (`kneeoa.runfolder.embeddings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kneeoa.errors import ConfigError
from kneeoa.models.encoders.base import Encoder
from kneeoa.models.encoders.device import resolve_device, resolve_precision
from kneeoa.models.encoders.loaders import LOADERS
from kneeoa.models.encoders.spec import EncoderSpec
from kneeoa.models.hub import Layout, file_sha256, first_existing, resolve_snapshot
from kneeoa.registry import Registry

if TYPE_CHECKING:
    from kneeoa.config import FoundationCfg

ENCODERS: Registry[EncoderSpec] = Registry("encoder", group="kneeoa.encoders", entry_type=EncoderSpec)

_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
ENCODERS.add("biomedclip", EncoderSpec(
    name="biomedclip", title="BiomedCLIP", hub_id="microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
    library="open_clip", arm_prefix="biomedclip", features={"projected": 512, "pre_projection": 768},
    layout=Layout(("open_clip_config.json", "vocab.txt", "tokenizer_config.json"), (_CLIP_WEIGHTS,)),
    weight_files=_CLIP_WEIGHTS, preprocess_file="open_clip_config.json",
    licence="MIT", paper="Zhang et al. 2023, BiomedCLIP, arXiv:2303.00915", zero_shot=True,
    notes={"text": "text tower config.json in <snapshot>/text/ (BiomedBERT)"}, family="general-domain FM"))
_RAD_DINO_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
ENCODERS.add("rad-dino", EncoderSpec(
    name="rad-dino", title="RAD-DINO", hub_id="microsoft/rad-dino", library="transformers", arm_prefix="raddino",
    features={"cls": 768, "cls_mean_patch": 1536},
    layout=Layout(("config.json", "preprocessor_config.json"), (_RAD_DINO_WEIGHTS,)),
    weight_files=_RAD_DINO_WEIGHTS, preprocess_file="preprocessor_config.json",
    licence="MSRLA (Microsoft Research Licence Agreement)", paper="Perez-Garcia et al. 2025, Nat Mach Intell, "
    "arXiv:2401.10815", family="chest-radiograph FM"))
# kneeoa's own two-branch knee CNN (kneeoa.models.encoders.ssl): pretrained without labels by `kneeoa pretrain`, and
# the same architecture with random weights as its control.
ENCODERS.add("kneessl", EncoderSpec(
    name="kneessl", title="knee SSL (SimCLR)", hub_id="kneeoa/kneessl", library="kneessl", arm_prefix="kneessl",
    features={"pooled": 256}, layout=Layout(("config.json", "model.safetensors")), weight_files=("model.safetensors",),
    preprocess_file="config.json", licence="the run's own", paper="Chen et al. 2020, SimCLR, arXiv:2002.05709",
    run_folder="encoders/kneessl", family="knee SSL (this run's images)"))
ENCODERS.add("random", EncoderSpec(
    name="random", title="random-init CNN", hub_id="kneeoa/random", library="random", arm_prefix="random",
    features={"pooled": 256}, layout=Layout(("config.json",)), weight_files=(), preprocess_file="config.json",
    licence="none", paper="control: kneessl's architecture, random weights",
    family="control: same CNN, random weights"))


def list_encoders() -> list[str]:
    return ENCODERS.names()


def get_encoder_spec(name: str) -> EncoderSpec:
    """The registry entry; an unknown name fails with the valid names and the nearest one."""
    return ENCODERS.get(name)


def create_encoder(name: str, weights: str | Path | None = None, *, features: str | None = None,
                   precision: str = "auto", device: str = "auto") -> Encoder:
    """Build a frozen encoder from local or cached weights.

    Args:
        name: registry name, `biomedclip` or `rad-dino`.
        weights: a snapshot folder in the hub layout (`huggingface-cli download ID --local-dir DIR`); None looks in
            the HF cache, then the hub (unless HF_HUB_OFFLINE=1).
        features: one of the entry's feature choices (default: the first, e.g. BiomedCLIP "projected" 512-d).
        precision: "auto" (bf16 where the hardware has it), "bf16" or "fp32".
        device: "auto", "cpu", "cuda", ...

    Raises:
        ConfigError: unknown encoder or feature choice.
        WeightsNotFoundError: no usable snapshot; names the hub id, layout and fetch command.
    """
    spec = get_encoder_spec(name)
    features = features or spec.default_features
    if features not in spec.features:
        raise ConfigError(f"The features of encoder '{spec.name}' must be one of {list(spec.features)}. "
                          f"Got {features!r}.")
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    lib = LOADERS.get(spec.library)
    snap = (lib.locate(spec, weights) if lib.locate else
            resolve_snapshot(spec.hub_id, spec.layout, weights, what=spec.title, fetch_hint=spec.fetch_hint))
    parts = lib.load(spec, snap, features, device)
    checksum = parts.pop("checksum", None) or file_sha256(first_existing(snap.path, spec.weight_files))
    cls = parts.pop("cls")
    for p in parts["model"].parameters():
        p.requires_grad_(False)
    return cls(spec=spec, snapshot=snap, features=features, precision=precision, device=device, checksum=checksum,
               **parts)


def fetch_encoder(name: str, dest: Path) -> Path:
    """Download an encoder's snapshot (and companion files) into `dest`, on a machine that reaches the hub.

    Raises:
        WeightsNotFoundError: the hub is unreachable (here: always) or the download is incomplete.
    """
    from kneeoa.models.hub import fetch_snapshot

    spec = get_encoder_spec(name)
    path = fetch_snapshot(spec.hub_id, Path(dest), spec.layout)
    companions = LOADERS.get(spec.library).companions
    if companions is not None:
        companions(path)
    return path


def weights_for(cfg: FoundationCfg, name: str, run_dir: Path | None = None) -> Path | None:
    """The explicit snapshot folder the config names for an encoder: `weights[name]`, else `weights_root/name` when
    that folder exists, else RUN_DIR/<run_folder> for an encoder made in the run, else None (the HF cache and hub
    are tried next)."""
    spec = get_encoder_spec(name)
    if spec.name in cfg.weights:
        return Path(cfg.weights[spec.name]).expanduser()
    if cfg.weights_root and (Path(cfg.weights_root).expanduser() / spec.name).is_dir():
        return Path(cfg.weights_root).expanduser() / spec.name
    if run_dir is not None and spec.run_folder:
        return Path(run_dir) / spec.run_folder
    return None


def features_for(cfg: FoundationCfg, name: str) -> str:
    """The feature choice the config makes for an encoder (`foundation.features[name]`), else the entry's default.

    Raises:
        ConfigError: the choice is not one of the entry's (names the valid ones).
    """
    spec = get_encoder_spec(name)
    choice = cfg.features.get(spec.name, spec.default_features)
    if choice not in spec.features:
        raise ConfigError(f"foundation.features.{spec.name} must be one of {list(spec.features)}. Got {choice!r}.")
    return choice


def zero_shot_spec(name: str) -> EncoderSpec:
    """The entry of an encoder that can classify by text prompts (`zeroshot.encoder`).

    Raises:
        ConfigError: unknown encoder, or one without a text tower (names those that have one).
    """
    spec = get_encoder_spec(name)
    if not spec.zero_shot:
        able = [n for n, s in ENCODERS.items() if s.zero_shot]
        raise ConfigError(f"zeroshot.encoder '{spec.name}' has no text tower, so it cannot classify by prompts. Use "
                          f"one of: {', '.join(able) or '(none registered)'}.")
    return spec


def encoder_arms(cfg: FoundationCfg, name: str) -> list[str]:
    """The arms built on an encoder's embeddings: `<prefix>_xgb`, plus `<prefix>_linear` when the probe is on."""
    prefix = get_encoder_spec(name).arm_prefix
    return [f"{prefix}_xgb", *([f"{prefix}_linear"] if cfg.linear_probe else [])]
