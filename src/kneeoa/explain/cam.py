"""Grad-CAM for the CNN arms and the ViT encoders, and scores of where the maps point.

Machinery (pytorch-grad-cam, Selvaraju et al. 2017): `gradcam(model, target_layer, inputs, classes)` returns one map
per image, ReLU'd, resized to the input and min-max scaled to [0, 1] per image (pytorch-grad-cam's own scaling).
For ViTs, `vit_reshape_transform` drops the prefix tokens (CLS, registers) and folds the patch tokens into their
grid so the same code applies.

Scores (phantom data, where each feature's mask is known):

* **Energy in mask**: sum of the map inside the mask over its sum over the image (1 = all attention on the feature;
  a map spread evenly scores the mask's area share).
* **Pointing game** (Zhang et al. 2018): a hit when the map's maximum lies inside the mask dilated by `tolerance`
  pixels (city-block), which forgives the coarse grid of the last layer.
* **Random baseline**: the same scores for Gaussian-smoothed white noise whose autocorrelation half-width matches
  the CAMs' (so a random map is as blobby as a CAM, and a score above it is not an artefact of smoothness).

Everything here is pure (arrays and modules in, arrays out); the explain stage does the files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from kneeoa.errors import ConfigError
from kneeoa.tasks import TASKS, get_task


def _require_gradcam():
    try:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as e:  # pragma: no cover - grad-cam is a core dependency
        raise ImportError("Grad-CAM (kneeoa.explain.cam) needs pytorch-grad-cam: pip install grad-cam") from e
    return pytorch_grad_cam.GradCAM, ClassifierOutputTarget


def gradcam(model: torch.nn.Module, target_layer: torch.nn.Module, inputs: torch.Tensor, classes: Sequence[int], *,
            reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """Grad-CAM of each image for one class.

    Args:
        model: maps (B, C, H, W) float to (B, K) logits.
        target_layer: the module whose activations and gradients make the map (ResNet18 `model.layer4[-1]`,
            ConvNeXt `model.stages[-1]`, a ViT block's `norm1`).
        inputs: (B, C, H, W) float, already normalised as the model expects.
        classes: (B,) class index per image whose logit is explained.
        reshape_transform: for token outputs (B, N, D) -> (B, D, h, w); see `vit_reshape_transform`.

    Returns:
        (B, H, W) float32 maps in [0, 1].
    """
    if len(classes) != len(inputs):
        raise ValueError(f"gradcam needs one class per image: {len(inputs)} images, {len(classes)} classes.")
    grad_cam, target = _require_gradcam()
    model.eval()
    with grad_cam(model=model, target_layers=[target_layer], reshape_transform=reshape_transform) as cam:
        maps = cam(input_tensor=inputs, targets=[target(int(c)) for c in classes])
    return np.asarray(maps, dtype=np.float32)


def vit_reshape_transform(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Fold ViT tokens (B, N, D) into a (B, D, h, w) feature map for Grad-CAM.

    The first N - h*w tokens (CLS, and register tokens where the model has them) are dropped; the rest are the
    patches in row-major order.

    Example:
        >>> vit_reshape_transform(torch.zeros(2, 1 + 16, 8), (4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """
    if isinstance(tokens, tuple | list):  # transformers layers return (hidden_states, ...)
        tokens = tokens[0]
    h, w = grid
    n_prefix = tokens.shape[1] - h * w
    if n_prefix < 0:
        raise ValueError(f"{tokens.shape[1]} tokens cannot fill a {h}x{w} patch grid.")
    patches = tokens[:, n_prefix:, :]
    return patches.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)


class _TensorOutput(torch.nn.Module):
    """Wraps a module whose forward returns a model-output object (transformers) so Grad-CAM sees a tensor."""

    def __init__(self, module: torch.nn.Module, head: Callable[[object], torch.Tensor]) -> None:
        super().__init__()
        self.module = module
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.module(x))


def vit_cam(module: torch.nn.Module, target_layer: torch.nn.Module, inputs: torch.Tensor, classes: Sequence[int], *,
            grid: tuple[int, int], head: Callable[[object], torch.Tensor] | None = None) -> np.ndarray:
    """Grad-CAM of a ViT (timm, open_clip or transformers) over its patch grid.

    Args:
        module: the ViT (or encoder + linear head) taking (B, C, H, W).
        target_layer: a module inside it whose output is the token sequence (e.g. timm `blocks[-1].norm1`,
            transformers Dinov2 `encoder.layer[-1].norm1`).
        inputs: (B, C, H, W) normalised images.
        classes: (B,) index of the output column explained for each image.
        grid: patch grid (H / patch, W / patch).
        head: maps the module's output to (B, K) scores when it is not already a tensor (e.g. a linear probe on
            `pooler_output`); default: the output itself.

    Returns:
        (B, H, W) float32 maps in [0, 1].
    """
    model = _TensorOutput(module, head or (lambda out: out))
    return gradcam(model, target_layer, inputs, classes,
                   reshape_transform=lambda t: vit_reshape_transform(t, grid))


# --------------------------------------------------------------------------------------------------------------
# Scoring against masks
# --------------------------------------------------------------------------------------------------------------


def resize_map(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (H, W) map to `shape` (the mask's crop resolution)."""
    if cam.shape == tuple(shape):
        return cam.astype(np.float32)
    im = Image.fromarray(np.asarray(cam, dtype=np.float32), mode="F").resize((shape[1], shape[0]), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32)


def task_mask(masks: dict[str, np.ndarray], task: str) -> np.ndarray:
    """The boolean mask that defines `task`'s feature (the union of its entry's `masks`), from one image's arrays."""
    names = get_task(task).masks
    if not names:
        with_masks = [n for n, t in TASKS.items() if t.masks]
        raise ConfigError(f"No feature mask defines task '{task}'. Tasks with masks: {', '.join(with_masks)}.")
    missing = [k for k in names if k not in masks]
    if missing:
        raise KeyError(f"mask file lacks array(s) {missing}; it has {sorted(masks)}.")
    return np.logical_or.reduce([np.asarray(masks[k], dtype=bool) for k in names])


def energy_in_mask(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's (non-negative) energy inside `mask`; NaN for an all-zero map.

    Example:
        >>> m = np.zeros((4, 4), bool); m[:2] = True
        >>> energy_in_mask(np.ones((4, 4)), m)
        0.5
    """
    cam = np.clip(np.asarray(cam, dtype=float), 0, None)
    total = cam.sum()
    return float(cam[np.asarray(mask, bool)].sum() / total) if total > 0 else float("nan")


def pointing_hit(cam: np.ndarray, mask: np.ndarray, tolerance: int = 0) -> bool:
    """Whether the map's maximum (first one, row-major) lies in `mask` dilated by `tolerance` pixels (city-block)."""
    mask = np.asarray(mask, bool)
    if tolerance > 0:
        mask = ndimage.binary_dilation(mask, iterations=int(tolerance))
    return bool(mask.flat[int(np.argmax(cam))])


def autocorrelation_halfwidth(maps: np.ndarray) -> float:
    """Lag (pixels) at which the maps' mean radial autocorrelation first falls to one half.

    Args:
        maps: (N, H, W) or (H, W) float maps.
    """
    maps = np.asarray(maps, dtype=float)
    maps = maps[None] if maps.ndim == 2 else maps
    x = maps - maps.mean(axis=(1, 2), keepdims=True)
    h, w = x.shape[1:]
    f = np.fft.rfft2(x, s=(2 * h, 2 * w))  # zero padding: linear, not circular, correlation
    ac = np.fft.irfft2(np.abs(f) ** 2, s=(2 * h, 2 * w)).mean(axis=0)
    ac = ac / ac[0, 0] if ac[0, 0] > 0 else ac
    iy, ix = np.indices(ac.shape)
    r = np.hypot(np.minimum(iy, 2 * h - iy), np.minimum(ix, 2 * w - ix))
    radius = np.rint(r).astype(int)
    radial = np.bincount(radius.ravel(), ac.ravel()) / np.maximum(np.bincount(radius.ravel()), 1)
    below = np.flatnonzero(radial[: min(h, w)] <= 0.5)
    if below.size == 0:
        return float(min(h, w))
    k = below[0]  # linear interpolation between lag k-1 (> 0.5) and k (<= 0.5)
    return float(k - 1 + (radial[k - 1] - 0.5) / (radial[k - 1] - radial[k])) if k > 0 else 0.0


def sigma_for_halfwidth(halfwidth: float) -> float:
    """Gaussian filter sigma giving white noise an autocorrelation half-width of `halfwidth` pixels.

    Filtered white noise has autocorrelation exp(-r^2 / (4 sigma^2)), which is 1/2 at r = 2 sigma sqrt(ln 2).
    """
    return max(float(halfwidth) / (2 * np.sqrt(np.log(2))), 0.0)


def random_map(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise, min-max scaled to [0, 1] like a CAM."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="reflect") if sigma > 0 else \
        rng.standard_normal(shape)
    lo, hi = noise.min(), noise.max()
    return ((noise - lo) / (hi - lo if hi > lo else 1)).astype(np.float32)


def score_maps(cams: Sequence[np.ndarray], masks: Sequence[np.ndarray], *, tolerance: int,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Energy-in-mask and pointing-game scores of CAMs and of matched random maps, per image.

    Args:
        cams: per image, a (h, w) map (any size; resized to its mask).
        masks: per image, the (H, W) boolean feature mask at crop resolution (non-empty).
        tolerance: pointing-game dilation in mask pixels.
        rng: for the random maps.

    Returns:
        dict of (N,) float arrays: cam_energy_in_mask, cam_pointing_game, cam_energy_in_mask_random,
        cam_pointing_game_random; and "sigma", the random maps' smoothing (0-d array).
    """
    resized = [resize_map(c, m.shape) for c, m in zip(cams, masks, strict=True)]
    if not resized:
        return {k: np.array([]) for k in ("cam_energy_in_mask", "cam_pointing_game", "cam_energy_in_mask_random",
                                          "cam_pointing_game_random")} | {"sigma": np.array(np.nan)}
    shapes = {r.shape for r in resized}
    halfwidth = float(np.mean([autocorrelation_halfwidth(np.stack([r for r in resized if r.shape == s]))
                               for s in shapes]))
    sigma = sigma_for_halfwidth(halfwidth)
    rand = [random_map(m.shape, sigma, rng) for m in masks]
    return {
        "cam_energy_in_mask": np.array([energy_in_mask(c, m) for c, m in zip(resized, masks, strict=True)]),
        "cam_pointing_game": np.array([pointing_hit(c, m, tolerance) for c, m in zip(resized, masks, strict=True)],
                                      dtype=float),
        "cam_energy_in_mask_random": np.array([energy_in_mask(c, m) for c, m in zip(rand, masks, strict=True)]),
        "cam_pointing_game_random": np.array([pointing_hit(c, m, tolerance) for c, m in zip(rand, masks, strict=True)],
                                             dtype=float),
        "sigma": np.array(sigma),
    }


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB float (H, W, 3) of a grayscale image with its CAM (resized to it) in the jet colour map on top."""
    from matplotlib import colormaps

    heat = colormaps["jet"](resize_map(cam, image.shape))[..., :3]
    gray = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=2)
    return (1 - alpha) * gray + alpha * heat
