"""What a crop goes through on its way into a model, in one object: orient, resize, quantise, normalise.

Every model kneeoa runs reads float crops in [0, 1] (what `kneeoa.formats.images.load_gray` returns) through a
`Preprocess`, and every stored model keeps its `Preprocess` as plain data (`to_dict`, read back by `from_dict`). Two
kinds of input share it:

- quantised inputs, those of kneeoa's CNNs (`quantised=True`, made by `Preprocess.for_cnn`): each crop is resized on
  its own to size x size (antialiased PIL bicubic) and rounded to 256 grey levels, exactly the pixels the training
  cache stores (`kneeoa.transforms.cache`), then normalised with the backbone's one mean and std. A checkpoint
  stores them as {image_size, in_chans, mean, std, mirror_left, tta}.
- encoder inputs: a batch is resized on tensors (antialiased, the processor's interpolation: shortest edge then
  centre crop, or squashed), grey repeated to the three channels the encoders were trained on, and normalised per
  channel. Size, crop, interpolation, mean and std are read from the weights' own files (`preprocess_from_open_clip`,
  `preprocess_from_hf`); nothing is assumed here. An embedding records them as {size, crop, mean, std,
  interpolation, resize_mode, source}.

The flip that puts a left knee in right-knee orientation and the normalisation formula are written once, here, as
functions (`mirror`, `orient`, `to_uint8`, `standardise`) for the callers that hold no `Preprocess` (manifest rows
marked `mirrored`, the cache at one size, augmentation's folded intensity tables); the object's methods call them.
Those steps are numpy only: torch is imported by the methods that make tensors, so film workers and table readers
that only flip or quantise never load it (`kneeoa.formats.pool` starts its workers differently once torch is loaded).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kneeoa.errors import ConfigError, DataError
from kneeoa.formats.images import resize

if TYPE_CHECKING:
    import torch

#: PIL resample codes used in preprocessor_config.json files -> torch interpolation modes.
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def mirror(img: np.ndarray) -> np.ndarray:
    """The image flipped left-right, as a contiguous array: a left knee in right-knee orientation (or a map of a
    mirrored knee back on its film)."""
    return np.ascontiguousarray(np.asarray(img)[:, ::-1])


def orient(img: np.ndarray, side: str, *, mirror_left: bool) -> np.ndarray:
    """Keep radiographic orientation, or, with `mirror_left`, mirror a left knee ("L") so it looks like a right one."""
    return mirror(img) if mirror_left and side == "L" else np.asarray(img)


def to_uint8(img: np.ndarray, size: int) -> np.ndarray:
    """A float crop in [0, 1] as size x size uint8 grey levels (antialiased PIL bicubic resize, then rounding): the
    training cache's exact pixels, and what a CNN's inputs are made of."""
    return np.round(resize(np.asarray(img, dtype=np.float32), size) * 255).astype(np.uint8)


def standardise(x: Any, mean: Any, std: Any) -> Any:
    """(x - mean) / std: the one normalisation formula, for numbers, arrays and tensors alike."""
    return (x - mean) / std


@dataclass(frozen=True)
class Preprocess:
    """Orient, resize, (quantise) and normalise float crops in [0, 1] into a model's input.

    Attributes:
        size: target of the resize: the shortest edge ("shortest") or the square side ("squash"), in pixels.
        crop: (height, width) of the centre crop after resizing.
        mean, std: normalisation, per channel (RGB order), or one value for every channel.
        interpolation: "bicubic", "bilinear" or "nearest".
        resize_mode: "shortest" (keep aspect ratio, then crop) or "squash" (resize straight to `size`).
        source: the file these values were read from.
        in_chans: channels of the model input: encoders take 3 (grey repeated); a CNN's records its network's input
            (kneeoa's CNNs read the one grey channel, `kneeoa.models.cnn.backbones.IN_CHANS`).
        quantised: resize crop by crop and round to uint8 as the training cache does (kneeoa's CNNs).
        mirror_left: the model was trained on left knees mirrored into right-knee orientation (`orient`).
        tta: average a CNN's probabilities over test-time views (`kneeoa.transforms.augment.tta_views`).
    """

    size: int
    crop: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    source: str = ""
    in_chans: int = 3
    quantised: bool = False
    mirror_left: bool = False
    tta: bool = False

    def __post_init__(self) -> None:
        where = self.source or "preprocessing"
        if self.resize_mode not in ("shortest", "squash"):
            raise ConfigError(f"{where}: resize mode {self.resize_mode!r} is not supported; kneeoa handles "
                              "'shortest' and 'squash'.")
        if self.interpolation not in _PIL_RESAMPLE.values():
            raise ConfigError(f"{where}: interpolation {self.interpolation!r} is not supported; use one of "
                              f"{sorted(_PIL_RESAMPLE.values())}.")
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, self.in_chans):
            raise ConfigError(f"{where}: mean {self.mean} and std {self.std} must give one value, or one per input "
                              f"channel ({self.in_chans}).")
        if self.quantised and ((self.resize_mode, self.interpolation, tuple(self.crop), len(self.mean), self.source)
                               != ("squash", "bicubic", (self.size, self.size), 1, "")):
            raise ConfigError(f"{where}: quantised (CNN) inputs are squashed to size x size with bicubic resizing "
                              "and normalised with one mean and std, from no file; make them with "
                              "Preprocess.for_cnn.")
        if not self.quantised and (self.in_chans != 3 or self.tta):
            raise ConfigError(f"{where}: encoder inputs have three channels and no test-time views; got in_chans "
                              f"{self.in_chans}, tta {self.tta}.")

    @classmethod
    def for_cnn(cls, size: int, mean: float, std: float, *, in_chans: int, **flags: bool) -> Preprocess:
        """A kneeoa CNN's input: size x size quantised grey crops, normalised with one mean and std; `flags` are
        `mirror_left` and `tta`."""
        return cls(size, (size, size), (float(mean),), (float(std),), "bicubic", "squash", in_chans=in_chans,
                   quantised=True, **flags)

    # The steps, in the order a crop meets them.

    def orient(self, img: np.ndarray, side: str) -> np.ndarray:
        """One crop in the model's orientation: a left knee mirrored when the model was trained on mirrored knees.
        Mirroring is its own inverse, so this also puts a map of the oriented crop back on the film."""
        return orient(img, side, mirror_left=self.mirror_left)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """A (B, C, H, W) float batch in [0, 1] resized on tensors and centre-cropped to `crop` (encoder inputs;
        quantised inputs are resized crop by crop in `quantise`)."""
        import torch.nn.functional as F

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
        return x[..., top:top + self.crop[0], left:left + self.crop[1]]

    def quantise(self, images: Any) -> np.ndarray:
        """(n, size, size) uint8 grey levels of n float crops in [0, 1] (a list, of any sizes, or an (n, H, W)
        array): the pixels the training cache holds for them (`to_uint8`)."""
        if not len(images):
            return np.zeros((0, self.size, self.size), dtype=np.uint8)
        return np.stack([to_uint8(img, self.size) for img in images])

    @staticmethod
    def dequantise(x: torch.Tensor) -> torch.Tensor:
        """uint8 grey levels as float intensities in [0, 1]."""
        return x.float() / 255.0

    def normalise(self, x: Any) -> Any:
        """(x - mean) / std of float intensities: per channel of a (B, C, H, W) batch, or, with one mean and std,
        of a tensor of any shape or a number."""
        if len(self.mean) == 1:
            return standardise(x, self.mean[0], self.std[0])
        return standardise(x, x.new_tensor(self.mean).view(1, -1, 1, 1), x.new_tensor(self.std).view(1, -1, 1, 1))

    def from_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """A uint8 batch (B, C, S, S), as the cache holds it, as the model's normalised float input: the one
        conversion training, validation and prediction share."""
        return self.normalise(self.dequantise(x))

    def __call__(self, images: Any) -> torch.Tensor:
        """(B, in_chans, h, w) float32 model input from float crops in [0, 1], already oriented: an array/tensor
        (B, H, W) or (B, 1|3, H, W) (encoders), or a list of (H, W) arrays of possibly different sizes."""
        import torch

        if self.quantised:
            return self.from_uint8(torch.from_numpy(self.quantise(images)).unsqueeze(1))
        if isinstance(images, list | tuple):
            shapes = {np.shape(im) for im in images}
            if len(shapes) > 1:  # crops of different sizes: resize one by one, then stack
                return torch.cat([self._encoder_batch(_as_batch(np.asarray(im)[None])) for im in images])
            images = np.stack([np.asarray(im, dtype=np.float32) for im in images]) if images else np.zeros(
                (0, *self.crop), dtype=np.float32)
        return self._encoder_batch(_as_batch(images))

    def one(self, img: np.ndarray) -> torch.Tensor:
        """One crop's model input, (in_chans, h, w)."""
        return self(np.asarray(img, dtype=np.float32)[None])[0]

    def _encoder_batch(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, self.in_chans, -1, -1)
        return self.normalise(self.resize(x)).contiguous()

    # Stored form.

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint or an embedding's record, in the layout of its kind (module docstring)."""
        if self.quantised:
            return {"image_size": self.size, "in_chans": self.in_chans, "mean": self.mean[0], "std": self.std[0],
                    "mirror_left": self.mirror_left, "tta": self.tta}
        out = {"size": self.size, "crop": self.crop, "mean": self.mean, "std": self.std,
               "interpolation": self.interpolation, "resize_mode": self.resize_mode, "source": self.source}
        return {**out, "mirror_left": True} if self.mirror_left else out

    @classmethod
    def from_dict(cls, data: Any, origin: str = "stored preprocessing") -> Preprocess:
        """The `Preprocess` a stored dict describes (either layout of `to_dict`).

        A CNN checkpoint needs image_size, in_chans, mean and std; mirror_left and tta are absent from checkpoints
        written before kneeoa mirrored knees or averaged test-time views, which did neither. An encoder record needs
        size, crop, mean and std.

        Raises:
            ConfigError: `data` is not a mapping, lacks a field, has one kneeoa does not know, or one of the wrong
                type; the message names `origin` and the field.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{origin}: preprocess must be a mapping of fields; got {type(data).__name__}. The "
                              "file is damaged or was not written by kneeoa; train or export the model again.")
        kind = "cnn" if "image_size" in data else "encoder" if "size" in data else None
        if kind is None:
            raise ConfigError(f"{origin}: preprocess has neither 'image_size' (a CNN checkpoint) nor 'size' (an "
                              f"encoder); its fields are {sorted(map(str, data))}. Train or export the model again.")
        required, optional = _LAYOUTS[kind]
        missing = [k for k in required if k not in data]
        unknown = sorted(str(k) for k in data if k not in required + optional)
        if missing or unknown:
            raise ConfigError(f"{origin}: preprocess field {(missing or unknown)[0]!r} is "
                              f"{'missing' if missing else 'not one kneeoa knows'} (a {kind} preprocess has "
                              f"{', '.join(required)} and optionally {', '.join(optional)}).")
        v = {k: _READERS[kind, k](data[k], f"{origin}: preprocess field {k!r}") for k in data}
        try:
            if kind == "cnn":
                flags = {k: v[k] for k in optional if k in v}
                return cls.for_cnn(v["image_size"], v["mean"], v["std"], in_chans=v["in_chans"], **flags)
            return cls(**v)
        except ConfigError as e:
            raise ConfigError(f"{origin}: {e}") from e


def _as_batch(images: Any) -> torch.Tensor:
    import torch

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


# Readers of stored fields: (value, where) -> the typed value, or a ConfigError naming where.

def _check(ok: bool, value: Any, where: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{where} must be {what}; got {value!r}. The file is damaged or was edited by hand; train "
                          "or export the model again.")


def _int(value: Any, where: str) -> int:
    _check(isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_) and value > 0, value, where,
           "a positive whole number")
    return int(value)


def _float(value: Any, where: str) -> float:
    _check(isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_), value, where, "a number")
    return float(value)


def _floats(value: Any, where: str) -> tuple[float, ...]:
    _check(isinstance(value, list | tuple) and len(value) > 0, value, where, "a list of numbers")
    return tuple(_float(v, where) for v in value)


def _pair(value: Any, where: str) -> tuple[int, int]:
    _check(isinstance(value, list | tuple) and len(value) == 2, value, where, "[height, width]")
    return _int(value[0], where), _int(value[1], where)


def _bool(value: Any, where: str) -> bool:
    _check(isinstance(value, bool | np.bool_), value, where, "true or false")
    return bool(value)


def _str(value: Any, where: str) -> str:
    _check(isinstance(value, str), value, where, "a string")
    return value


#: Stored fields of each layout: (required, optional).
_LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "cnn": (("image_size", "in_chans", "mean", "std"), ("mirror_left", "tta")),
    "encoder": (("size", "crop", "mean", "std"), ("interpolation", "resize_mode", "source", "mirror_left")),
}
_READERS: dict[tuple[str, str], Callable[[Any, str], Any]] = {
    **{("cnn", k): r for k, r in {"image_size": _int, "in_chans": _int, "mean": _float, "std": _float,
                                  "mirror_left": _bool, "tta": _bool}.items()},
    **{("encoder", k): r for k, r in {"size": _int, "crop": _pair, "mean": _floats, "std": _floats,
                                      "interpolation": _str, "resize_mode": _str, "source": _str,
                                      "mirror_left": _bool}.items()},
}


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
