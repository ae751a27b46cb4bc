"""Supervised CNN arms: timm backbones with one linear head per task, their weights and their preprocessing.

The paper trains ResNet18 and ConvNeXt-Small end to end. We default to ONE multi-task model per backbone (a shared
backbone, a head per task, the sum of the tasks' cross-entropies): the four targets are facets of the same
radiographic picture, the shared model costs a quarter of the compute of four models (what makes the CPU demo
possible), and `cnn.multitask: false` trains one model per task instead with the same code.

Pretrained weights are resolved in one place (`resolve_pretrained`): an explicit local file, the local cache, the
hub; without any, the model starts from random init and says so (the arm record and the report carry it).
Every checkpoint stores the preprocessing it needs (`cnn_preprocess`: input size, channels, mean/std from the
weights' timm config), as the plain data of a `kneeoa.transforms.preprocess.Preprocess`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kneeoa.errors import ConfigError, WeightsNotFoundError
from kneeoa.models.cnn.encoder_folder import WEIGHTS_FILE, is_encoder_dir, read_encoder_config
from kneeoa.models.cnn.heads import HEADS
from kneeoa.models.hub import cached_file, hub_offline
from kneeoa.registry import Registry
from kneeoa.transforms.preprocess import Preprocess

_logger = logging.getLogger(__name__)


def _timm_model(name: str, source: str | None, tag: str | None, in_chans: int, **args: Any) -> nn.Module:
    """A headless timm model: random init (source None), hub weights ("hub") or weights from a local file; `args`
    go to `timm.create_model` (e.g. drop_path_rate)."""
    import timm

    if source is None:
        return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=0, **args)
    overlay = {} if source == "hub" else {"pretrained_cfg_overlay": {"file": source}}
    return timm.create_model(f"{name}.{tag}", pretrained=True, in_chans=in_chans, num_classes=0, **overlay, **args)


def _twobranch(name: str, source: str | None, tag: str | None, in_chans: int, **args: Any) -> nn.Module:
    """The two-branch knee CNN; `source` is a local state-dict file (kneeoa has no hub weights for it); `args` go to
    `TwoBranchNet` (e.g. patch_height)."""
    from kneeoa.models.cnn.twobranch import TwoBranchNet

    net = TwoBranchNet(in_chans=in_chans, **args)
    if source is not None:
        from safetensors.torch import load_file

        state = load_file(source) if str(source).endswith(".safetensors") else torch.load(source, map_location="cpu")
        net.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state, strict=False)
    return net


@dataclass(frozen=True)
class Backbone:
    """A registered CNN backbone.

    Attributes:
        name: arm name (`resnet18`, `convnext_small`, `twobranch`); the timm architecture for timm backbones.
        pretrained_tag: timm weight tag used when pretrained weights are wanted (hub id `timm/<name>.<tag>`);
            None for a backbone with no published weights (only a local file can initialise it).
        channels_last: whether channels_last memory format helps on CPU (it slows ConvNeXt by ~0.7x here).
        cam_layers: the layers Grad-CAM can hook, by name: "last" (the last block, the usual choice) and
            "penultimate" (the last block of the stage before, twice the spatial resolution).
        build: (name, weights source or None, pretrained tag, in_chans, **constructor arguments) -> headless module
            with `num_features`.
    """

    name: str
    pretrained_tag: str | None
    channels_last: bool
    cam_layers: dict[str, Callable[[nn.Module], nn.Module]]
    build: Callable[..., nn.Module] = _timm_model

    @property
    def hub_id(self) -> str | None:
        return f"timm/{self.name}.{self.pretrained_tag}" if self.pretrained_tag else None


BACKBONES: Registry[Backbone] = Registry("backbone", group="kneeoa.backbones", entry_type=Backbone)
BACKBONES.add("resnet18", Backbone("resnet18", "a1_in1k", True,
                                    {"last": lambda m: m.layer4[-1], "penultimate": lambda m: m.layer3[-1]}))
BACKBONES.add("convnext_small", Backbone("convnext_small", "in12k_ft_in1k", False,
                                         {"last": lambda m: m.stages[-1], "penultimate": lambda m: m.stages[-2]}))
# Both CAM names hook the fold of the two branches' last maps: the only layer in image layout.
BACKBONES.add("twobranch", Backbone("twobranch", None, True,
                                    {"last": lambda m: m.fold, "penultimate": lambda m: m.fold}, build=_twobranch))


def resolve_pretrained(backbone: Backbone, pretrained: str, weights_file: str | None) -> tuple[str | None, str]:
    """Where this backbone's starting weights come from: (file or "hub" or None, human-readable source).

    Order: an explicit file (`cnn.weights[backbone]`, or `cnn.pretrained` given as a path; an encoder folder from
    `kneeoa pretrain` means its model.safetensors), then the local HF cache,
    then the hub (only with `pretrained: auto`; `cache` never goes online), else random init.

    Raises:
        WeightsNotFoundError: an explicit weights file that does not exist.
    """
    explicit = weights_file or (pretrained if pretrained not in ("auto", "cache", "none") else None)
    if explicit:
        if not Path(explicit).exists():
            raise WeightsNotFoundError(
                f"Weights file {explicit} for backbone '{backbone.name}' does not exist. Give a .pth/.safetensors "
                f"file (e.g. from `huggingface-cli download {backbone.hub_id}` on a connected machine) or set "
                "cnn.pretrained to auto, cache or none.")
        if is_encoder_dir(Path(explicit)):  # an encoder folder from `kneeoa pretrain`: its backbone weights
            info = read_encoder_config(Path(explicit))
            if info["backbone"] != backbone.name:
                raise ConfigError(f"Encoder folder {explicit} holds a '{info['backbone']}' backbone, not "
                                  f"'{backbone.name}'; use it with cnn.backbones: [{info['backbone']}].")
            return (str(Path(explicit) / WEIGHTS_FILE),
                    f"encoder folder {explicit} ({info['method']} pretraining, {info['n_images']} images, "
                    f"{info['epochs']} epochs)")
        return str(explicit), f"local file {explicit}"
    if pretrained == "none":
        return None, "random init (cnn.pretrained: none)"
    if pretrained not in ("auto", "cache"):
        raise ConfigError(f"cnn.pretrained must be auto, cache, none or a weights file path. Got {pretrained!r}.")
    if backbone.hub_id is None:
        return None, f"random init: {backbone.name} has no published weights (give a local file to start from one)"
    cached = next(filter(None, (cached_file(backbone.hub_id, f) for f in ("model.safetensors", "pytorch_model.bin"))),
                  None)
    if cached:
        return str(cached), f"{backbone.hub_id} (local cache {cached})"
    if pretrained == "auto" and not hub_offline():
        return "hub", f"{backbone.hub_id} (hub)"
    return None, (f"random init: no {backbone.hub_id} weights in the local cache and the hub was not used; "
                  f"fetch them with `huggingface-cli download {backbone.hub_id}` or set cnn.weights.{backbone.name}")


#: Input channels of kneeoa's CNNs: radiographs are grey.
IN_CHANS = 1


def create_backbone(name: str, *, source: str | None, in_chans: int = IN_CHANS,
                    args: dict[str, Any] | None = None) -> tuple[nn.Module, str | None]:
    """A headless backbone (`num_classes=0`) for `in_chans` channels; `args` are keyword arguments of its
    constructor (`cnn.backbone_args`, e.g. the two-branch net's `patch_height`).

    Returns (module, error) where error is the reason a hub download failed (then the module is randomly
    initialised and the caller must record that).

    Raises:
        ConfigError: `args` that the backbone does not take, or values it refuses.
    """
    bb = BACKBONES.get(name)
    args = dict(args or {})

    def build(src: str | None) -> nn.Module:
        return bb.build(bb.name, src, bb.pretrained_tag, in_chans, **args)

    if source is None or args:
        try:  # random init; with arguments, also their check, so a bad one is not reported as a bad weights file
            plain = build(None)
        except (TypeError, ValueError) as e:
            if not args:
                raise
            raise ConfigError(f"cnn.backbone_args {args} do not fit the backbone {name}: {e}. They are "
                              "keyword arguments of its constructor: remove or correct them.") from e
        if source is None:
            return plain, None
    try:
        return build(source), None
    except (OSError, RuntimeError, ValueError) as e:
        if source != "hub":
            raise WeightsNotFoundError(f"Weights file {source} could not be loaded into {bb.name}: {e}") from e
        return build(None), str(e)


def norm_stats(module: nn.Module) -> tuple[float, float]:
    """Single-channel mean/std from the backbone's timm pretrained config (average over RGB)."""
    cfg = getattr(module, "pretrained_cfg", {}) or {}
    return float(np.mean(cfg.get("mean", (0.5,)))), float(np.mean(cfg.get("std", (0.5,))))


def cnn_preprocess(module: nn.Module, image_size: int, *, mirror_left: bool, tta: bool) -> Preprocess:
    """The input of a CNN on `module`, as its training loaders feed it and its checkpoint stores it: quantised grey
    crops at `image_size`, normalised with the backbone's weights' mean and std (`norm_stats`)."""
    mean, std = norm_stats(module)
    return Preprocess.for_cnn(image_size, mean, std, in_chans=IN_CHANS, mirror_left=mirror_left, tta=tta)


def input_rows(module: nn.Module, size: int) -> tuple[int, int] | None:
    """The rows [top, bottom) of a size x size input that a backbone reads (`input_rows` of backbones that look at
    a band only, such as the two-branch net), or None when it reads the whole image."""
    rows = getattr(module, "input_rows", None)
    return rows(size) if rows else None


class MultiTaskNet(nn.Module):
    """A backbone and one linear head per task; forward returns {task: (B, n_outputs) raw outputs}.

    Args:
        backbone: headless module with `num_features`.
        tasks: task -> number of classes K.
        heads: task -> output head name (`kneeoa.models.cnn.heads.HEADS`; default "ce" for every task).
    """

    def __init__(self, backbone: nn.Module, tasks: dict[str, int], heads: dict[str, str] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.n_classes = dict(tasks)
        self.head_names = {t: (heads or {}).get(t, "ce") for t in tasks}
        self.heads = nn.ModuleDict({t: nn.Linear(backbone.num_features, HEADS.get(self.head_names[t]).n_outputs(k))
                                    for t, k in tasks.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        return {t: head(feats) for t, head in self.heads.items()}

    def probs(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Class probabilities (B, K) per task from `forward`'s raw outputs, through each task's head."""
        return {t: HEADS.get(self.head_names[t]).probs(v, self.n_classes[t]) for t, v in outputs.items()}


class TaskView(nn.Module):
    """One task's class scores of a MultiTaskNet as a plain (B, 1, H, W) -> (B, K) classifier (for Grad-CAM).

    Cross-entropy heads give their logits; ordinal heads give log class probabilities (their outputs are not one
    score per class).
    """

    def __init__(self, net: MultiTaskNet, task: str) -> None:
        super().__init__()
        self.net, self.task = net, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)[self.task]
        if self.net.head_names[self.task] == "ce":
            return out
        return torch.log(self.net.probs({self.task: out})[self.task].clamp(min=1e-8))


def make_payload(net: MultiTaskNet, *, backbone: str, preprocess: Preprocess, weights_source: str,
                 decoding: dict[str, dict] | None = None, extra: dict[str, Any] | None = None,
                 backbone_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """One member's checkpoint payload: weights plus everything needed to rebuild and feed the model (plain data
    only: the preprocessing as `Preprocess.to_dict`, the backbone's constructor arguments)."""
    return {"backbone": backbone, "backbone_args": dict(backbone_args or {}), "tasks": dict(net.n_classes),
            "heads": dict(net.head_names),
            "state_dict": {k: v.contiguous() for k, v in net.state_dict().items()}, "preprocess": preprocess.to_dict(),
            "weights_source": weights_source,
            "decoding": decoding or {t: {"method": "argmax"} for t in net.n_classes}, "extra": extra or {}}


def write_checkpoint(path: Path, members: list[dict[str, Any]]) -> Path:
    """Write one member payload, or {"members": [...]} for an ensemble, atomically (read back by
    `kneeoa.models.cnn.infer.read_members`)."""
    from kneeoa.io import atomic_path

    with atomic_path(Path(path)) as tmp:
        torch.save(members[0] if len(members) == 1 else {"members": members}, tmp)
    return Path(path)


def save_checkpoint(path: Path, net: MultiTaskNet, **payload: Any) -> Path:
    """Write a single network's checkpoint (`make_payload`'s keyword arguments)."""
    return write_checkpoint(path, [make_payload(net, **payload)])


def net_from_payload(payload: dict[str, Any], origin: str = "checkpoint") -> MultiTaskNet:
    """Rebuild the network a checkpoint payload describes and load its weights (eval mode); `origin` names the
    payload's file in errors."""
    bb = BACKBONES.get(payload["backbone"])
    in_chans = Preprocess.from_dict(payload["preprocess"], origin).in_chans
    backbone = bb.build(bb.name, None, bb.pretrained_tag, in_chans, **payload.get("backbone_args", {}))
    net = MultiTaskNet(backbone, payload["tasks"], payload.get("heads"))
    net.load_state_dict(payload["state_dict"])
    return net.eval()
