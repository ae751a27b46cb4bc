"""Frozen foundation-model encoders (BiomedCLIP, RAD-DINO): grayscale knee crops in, one vector per image out.

An encoder entry is data: hub id, embedding sizes per feature choice, the snapshot file its preprocessing is read
from, licence and paper. `create_encoder` resolves the weights (explicit folder, HF cache, hub; see
`kneeoa.models.hub`), builds the model with the library that publishes it (open_clip or transformers) and reads the
resize / crop / normalisation settings from the snapshot's own files, so no mean or std is written here.

Inputs are float crops in [0, 1] (what `kneeoa.data.images.load_gray` returns). The processors' 1/255 rescale is
therefore already applied; grayscale is repeated to the three channels both models were trained on. Resizing runs on
tensors (antialiased, the processor's interpolation), so a batch is preprocessed in one call.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from kneeoa.config import FoundationCfg
from kneeoa.errors import ConfigError, DataError, ManifestError, WeightsNotFoundError
from kneeoa.models.hub import Layout, Snapshot, cached_file, file_sha256, first_existing, hub_offline, resolve_snapshot
from kneeoa.registry import Registry

_log = logging.getLogger(__name__)

#: PIL resample codes used in preprocessor_config.json files -> torch interpolation modes.
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


# --------------------------------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preprocess:
    """Resize, centre-crop and normalise a batch of [0, 1] grayscale crops into a model's input.

    Attributes:
        size: target of the resize: the shortest edge ("shortest") or the square side ("squash"), in pixels.
        crop: (height, width) of the centre crop after resizing.
        mean, std: per-channel normalisation (RGB order).
        interpolation: "bicubic", "bilinear" or "nearest".
        resize_mode: "shortest" (keep aspect ratio, then crop) or "squash" (resize straight to `size`).
        source: the file these values were read from.
    """

    size: int
    crop: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    source: str = ""

    def __post_init__(self) -> None:
        if self.resize_mode not in ("shortest", "squash"):
            raise ConfigError(f"{self.source}: resize mode {self.resize_mode!r} is not supported; kneeoa handles "
                              "'shortest' and 'squash'.")
        if self.interpolation not in _PIL_RESAMPLE.values():
            raise ConfigError(f"{self.source}: interpolation {self.interpolation!r} is not supported; use one of "
                              f"{sorted(_PIL_RESAMPLE.values())}.")

    def __call__(self, images: Any) -> torch.Tensor:
        """(B, 3, crop_h, crop_w) float32 model input from images: an array/tensor (B, H, W) or (B, 1|3, H, W), or a
        list of (H, W) arrays of possibly different sizes; values in [0, 1]."""
        if isinstance(images, list | tuple):
            shapes = {np.shape(im) for im in images}
            if len(shapes) > 1:  # crops of different sizes: resize one by one, then stack
                return torch.cat([self._batch(_as_batch(np.asarray(im)[None])) for im in images])
            images = np.stack([np.asarray(im, dtype=np.float32) for im in images]) if images else np.zeros(
                (0, *self.crop), dtype=np.float32)
        return self._batch(_as_batch(images))

    def _batch(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if self.resize_mode == "squash":
            new = (self.size, self.size)
        else:
            scale = self.size / min(h, w)
            new = (max(1, round(h * scale)), max(1, round(w * scale)))
        if new != (h, w) and x.shape[0]:
            smooth = self.interpolation != "nearest"
            x = F.interpolate(x, size=new, mode=self.interpolation, antialias=smooth,
                              **({"align_corners": False} if smooth else {})).clamp(0, 1)
        top, left = max(0, (new[0] - self.crop[0]) // 2), max(0, (new[1] - self.crop[1]) // 2)
        x = x[..., top:top + self.crop[0], left:left + self.crop[1]]
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_batch(images: Any) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images).float()
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DataError(f"Encoders take grayscale crops shaped (B, H, W) or (B, 1, H, W); got shape "
                        f"{tuple(x.shape)}.")
    if x.numel() and (x.min() < -1e-4 or x.max() > 1 + 1e-4):
        raise DataError(f"Encoders take crops with values in [0, 1]; got {x.min():.3g} to {x.max():.3g}. Load images "
                        "with kneeoa.data.images.load_gray (8-bit images divided by 255, 16-bit by 65535).")
    return x


def preprocess_from_open_clip(cfg: dict[str, Any], source: str) -> Preprocess:
    """Preprocess from open_clip's merged `preprocess_cfg` (defaults + the snapshot's open_clip_config.json)."""
    size = cfg["size"]
    side = size if isinstance(size, int) else size[0]
    crop = (size, size) if isinstance(size, int) else tuple(size)
    return Preprocess(side, crop, tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"),
                      cfg.get("resize_mode", "shortest"), source)


def preprocess_from_hf(proc: Any, source: str) -> Preprocess:
    """Preprocess from a transformers image processor read from the snapshot's preprocessor_config.json."""
    size = proc.size
    shortest = getattr(size, "shortest_edge", None) or (size.get("shortest_edge") if isinstance(size, dict) else None)
    if shortest:
        side, mode = int(shortest), "shortest"
    else:
        side, mode = int(size["height"] if isinstance(size, dict) else size.height), "squash"
    crop = (side, side)
    if getattr(proc, "do_center_crop", False):
        cs = proc.crop_size
        crop = (int(cs["height"]), int(cs["width"])) if isinstance(cs, dict) else (int(cs.height), int(cs.width))
    normalise = getattr(proc, "do_normalize", True)
    mean = tuple(float(m) for m in proc.image_mean) if normalise else (0.0, 0.0, 0.0)
    std = tuple(float(s) for s in proc.image_std) if normalise else (1.0, 1.0, 1.0)
    resample = int(proc.resample)
    if resample not in _PIL_RESAMPLE:
        raise ConfigError(f"{source}: resample code {resample} is not supported; kneeoa handles {_PIL_RESAMPLE}.")
    return Preprocess(side, crop, mean, std, _PIL_RESAMPLE[resample], mode, source)


# ---------------------------------------------------------------------------------------------------- the encoder
def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else is passed to torch."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def cpu_has_bf16() -> bool:
    """True when this CPU runs bf16 natively (AVX512-BF16 or AMX): bf16 autocast is then ~1.5x faster than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, device: str) -> str:
    """"auto" -> "bf16" on GPUs and CPUs with native bf16, else "fp32". bf16 features stay within cosine 0.9999."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"The 'precision' option of the foundation encoders must be one of 'auto', 'bf16', "
                          f"'fp32'. Got {precision!r}.")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


class Encoder:
    """A frozen image encoder: `encode(images) -> (B, dim) float32`.

    Attributes:
        spec: the registry entry. model_id: hub id. revision: hub commit ("unknown" for an undated folder).
        checksum: SHA-256 of the weights file, so two folders of the same revision can still be told apart.
        features: which vector ("projected", "cls", ...). dim: its length. preprocess: the input pipeline.
        precision: "bf16" or "fp32". device: torch device string. snapshot: where the weights were found.
    """

    def __init__(self, *, spec: EncoderSpec, snapshot: Snapshot, model: torch.nn.Module,
                 forward: Callable[[torch.Tensor], torch.Tensor], preprocess: Preprocess, dim: int, features: str,
                 precision: str, device: str, checksum: str) -> None:
        self.spec, self.snapshot, self.model, self._forward = spec, snapshot, model.eval(), forward
        self.preprocess, self.dim, self.features = preprocess, dim, features
        self.precision, self.device, self.checksum = precision, device, checksum

    @property
    def model_id(self) -> str:
        return self.spec.hub_id

    @property
    def revision(self) -> str:
        return self.snapshot.revision

    def _autocast(self):
        return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def forward(self, x: torch.Tensor) -> np.ndarray:
        """The bare model pass on preprocessed input (B, 3, h, w) -> (B, dim) float32."""
        with torch.inference_mode(), self._autocast():
            return self._forward(x.to(self.device)).float().cpu().numpy()

    def encode(self, images: Any) -> np.ndarray:
        """Embed grayscale crops.

        Args:
            images: (B, H, W) or (B, 1, H, W) float array/tensor in [0, 1], or a list of (H, W) arrays.

        Returns:
            (B, dim) float32.
        """
        return self.forward(self.preprocess(images))

    def describe(self) -> dict[str, Any]:
        """Provenance written beside every embedding: what ran, from which weights, with which preprocessing."""
        return {"encoder": self.spec.name, "model_id": self.model_id, "revision": self.revision,
                "checksum": self.checksum, "weights_source": self.snapshot.source,
                "weights_path": str(self.snapshot.path), "features": self.features, "dim": self.dim,
                "precision": self.precision, "preprocess": self.preprocess.to_dict()}


class ClipEncoder(Encoder):
    """An image-text encoder (BiomedCLIP): adds `encode_text` and the learned `logit_scale` for zero-shot use."""

    def __init__(self, *, tokenizer: Callable[[list[str]], torch.Tensor], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tokenizer = tokenizer

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), D) float32 projected text embeddings (not normalised)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        with torch.inference_mode(), self._autocast():
            return self.model.encode_text(tokens).float().cpu().numpy()

    def encode_projected(self, images: Any) -> np.ndarray:
        """(B, D) projected image embeddings whatever `features` is: zero-shot needs the joint space."""
        with torch.inference_mode(), self._autocast():
            return self.model.encode_image(self.preprocess(images).to(self.device)).float().cpu().numpy()


# --------------------------------------------------------------------------------------------------------- loaders
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


@dataclass(frozen=True)
class Library:
    """How one model library builds an encoder from a snapshot, and what else a snapshot needs fetched."""

    load: Callable[..., dict[str, Any]]
    companions: Callable[[Path], None] | None = None


LOADERS: Registry[Library] = Registry("encoder library")
LOADERS.add("open_clip", Library(_load_open_clip, _fetch_text_tower))
LOADERS.add("transformers", Library(_load_transformers))


# -------------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class EncoderSpec:
    """One registered encoder, as data.

    Attributes:
        name: registry name (`biomedclip`, `rad-dino`). title: display name. hub_id: Hugging Face repository.
        library: the LOADERS entry that builds it. arm_prefix: prefix of its arms (`raddino_xgb`).
        features: feature choice -> embedding size of the published model; the first is the default.
        layout: files a snapshot must hold. weight_files: checkpoint names, in order of preference.
        preprocess_file: the snapshot file the preprocessing is read from.
        features_option: FoundationCfg field choosing the features. licence, paper: provenance for the report.
    """

    name: str
    title: str
    hub_id: str
    library: str
    arm_prefix: str
    features: dict[str, int]
    layout: Layout
    weight_files: tuple[str, ...]
    preprocess_file: str
    features_option: str
    licence: str
    paper: str
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def default_features(self) -> str:
        return next(iter(self.features))

    @property
    def fetch_hint(self) -> str:
        return f"kneeoa models fetch {self.name} --dest DIR"


ENCODERS: Registry[EncoderSpec] = Registry("encoder")


def _add(spec: EncoderSpec) -> None:
    ENCODERS.add(spec.name, spec)


_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
_add(EncoderSpec(
    name="biomedclip", title="BiomedCLIP", hub_id="microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
    library="open_clip", arm_prefix="biomedclip", features={"projected": 512, "pre_projection": 768},
    layout=Layout(("open_clip_config.json", "vocab.txt", "tokenizer_config.json"), (_CLIP_WEIGHTS,)),
    weight_files=_CLIP_WEIGHTS, preprocess_file="open_clip_config.json", features_option="biomedclip_features",
    licence="MIT", paper="Zhang et al. 2023, BiomedCLIP, arXiv:2303.00915",
    notes={"text": "text tower config.json in <snapshot>/text/ (BiomedBERT)"}))
_RAD_DINO_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_add(EncoderSpec(
    name="rad-dino", title="RAD-DINO", hub_id="microsoft/rad-dino", library="transformers", arm_prefix="raddino",
    features={"cls": 768, "cls_mean_patch": 1536},
    layout=Layout(("config.json", "preprocessor_config.json"), (_RAD_DINO_WEIGHTS,)),
    weight_files=_RAD_DINO_WEIGHTS, preprocess_file="preprocessor_config.json", features_option="raddino_features",
    licence="MSRLA (Microsoft Research Licence Agreement)", paper="Perez-Garcia et al. 2025, Nat Mach Intell, "
    "arXiv:2401.10815"))


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
    snap = resolve_snapshot(spec.hub_id, spec.layout, weights, what=spec.title, fetch_hint=spec.fetch_hint)
    parts = LOADERS.get(spec.library).load(spec, snap, features, device)
    weights_file = first_existing(snap.path, spec.weight_files)
    cls = parts.pop("cls")
    for p in parts["model"].parameters():
        p.requires_grad_(False)
    return cls(spec=spec, snapshot=snap, features=features, precision=precision, device=device,
               checksum=file_sha256(weights_file), **parts)


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


def weights_for(cfg: FoundationCfg, name: str) -> Path | None:
    """The explicit snapshot folder the config names for an encoder: `weights[name]`, else `weights_root/name` when
    that folder exists, else None (the HF cache and hub are tried next)."""
    spec = get_encoder_spec(name)
    if spec.name in cfg.weights:
        return Path(cfg.weights[spec.name]).expanduser()
    if cfg.weights_root and (Path(cfg.weights_root).expanduser() / spec.name).is_dir():
        return Path(cfg.weights_root).expanduser() / spec.name
    return None


def features_for(cfg: FoundationCfg, name: str) -> str:
    """The feature choice the config makes for an encoder (`biomedclip_features`, `raddino_features`)."""
    spec = get_encoder_spec(name)
    return getattr(cfg, spec.features_option)


def encoder_arms(cfg: FoundationCfg, name: str) -> list[str]:
    """The arms built on an encoder's embeddings: `<prefix>_xgb`, plus `<prefix>_linear` when the probe is on."""
    prefix = get_encoder_spec(name).arm_prefix
    return [f"{prefix}_xgb", *([f"{prefix}_linear"] if cfg.linear_probe else [])]


# ------------------------------------------------------------------------------------------ the embedding table
#: RUN_DIR/embeddings/<encoder>.parquet (image_id, emb_0 .. emb_{D-1} float32) + <encoder>.json (provenance).
EMBED_DIR = "embeddings"


def embeddings_path(run_dir: Path, encoder: str) -> Path:
    return Path(run_dir) / EMBED_DIR / f"{get_encoder_spec(encoder).name}.parquet"


def vector_columns(dim: int) -> list[str]:
    return [f"emb_{i}" for i in range(dim)]


def read_embeddings(run_dir: Path, encoder: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The embedding table (image_id + emb_*) of an encoder and its provenance record.

    Raises:
        ManifestError: the table is missing (names the command that makes it).
    """
    path = embeddings_path(run_dir, encoder)
    info = path.with_suffix(".json")
    if not path.exists() or not info.exists():
        raise ManifestError(f"{path} does not exist. Make it with `kneeoa embed {run_dir} --encoder {encoder}`.")
    return pd.read_parquet(path), json.loads(info.read_text())


def embedding_matrix(table: pd.DataFrame) -> np.ndarray:
    """(n_images, D) float32 from an embedding table's emb_* columns, in dimension order."""
    cols = sorted((c for c in table.columns if c.startswith("emb_")), key=lambda c: int(c[4:]))
    return table[cols].to_numpy(dtype=np.float32)
