"""Encoder preprocessing read from a snapshot's own files: resize, centre-crop and normalise grayscale crops.

Inputs are float crops in [0, 1] (what `kneeoa.formats.images.load_gray` returns). The processors' 1/255 rescale is
therefore already applied; grayscale is repeated to the three channels the encoders were trained on. Resizing runs on
tensors (antialiased, the processor's interpolation), so a batch is preprocessed in one call. No mean or std is
written here: `preprocess_from_open_clip` and `preprocess_from_hf` read them from the weights' configuration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kneeoa.errors import ConfigError, DataError

#: PIL resample codes used in preprocessor_config.json files -> torch interpolation modes.
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


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
                        "with kneeoa.formats.images.load_gray (8-bit images divided by 255, 16-bit by 65535).")
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
