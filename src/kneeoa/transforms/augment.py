"""Training-time augmentation of whole batches: random draws for the batch at once, pixels image by image in OpenCV.

Per-image PIL/torchvision transforms cost more than a small CNN's step on two CPU cores, and so do whole-batch torch
ops (`grid_sample`, a gather for the intensity table), whose memory passes over a cold cache cost twice their
arithmetic. Here the draws (rotation, scale, shift, optional flip; gamma, contrast and brightness; noise; blur) are
made for the whole batch with one torch generator, and each image is then warped on its uint8 grey levels, mapped
to float through its 256-entry intensity table (gamma is the exposure curve that matters for radiographs), given
noise from a bank of fields and sometimes a light blur, in a few single-threaded OpenCV calls that keep it in cache.
No colour jitter: radiographs are grayscale. For a network that reads only a band of rows (the two-branch net reads
the middle half) only that band is computed (`rows`); `group` lets batch neighbours share one geometric draw, warped
together in one OpenCV call.

Policies are registry entries (`cnn.augment_policy`): `standard` is mild geometry and contrast; `strong` is the
Tiulpin et al. 2018 family (larger rotations, gamma, noise, blur), for training small networks from scratch;
`strong_sharp` is `strong` without the noise and blur; `ssl` makes the two views of self-supervised pretraining.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from kneeoa.registry import Registry
from kneeoa.transforms.preprocess import Preprocess, standardise


@dataclass(frozen=True)
class Policy:
    """Ranges of one augmentation policy (each drawn uniformly per image)."""

    degrees: float = 7.0
    scale: tuple[float, float] = (0.92, 1.08)
    translate: float = 0.04  # share of the image side
    gamma: tuple[float, float] = (1.0, 1.0)
    contrast: tuple[float, float] = (0.85, 1.15)
    brightness: float = 0.06
    noise: float = 0.0  # max Gaussian noise sd (intensity units)
    blur_p: float = 0.0  # share of images blurred with a 3x3 Gaussian


POLICIES: Registry[Policy] = Registry("augmentation policy")
POLICIES.add("standard", Policy())
_STRONG = Policy(degrees=10.0, scale=(0.9, 1.1), translate=0.05, gamma=(0.6, 1.6), contrast=(0.8, 1.25),
                 brightness=0.08, noise=0.02, blur_p=0.2)
POLICIES.add("strong", _STRONG)
# The same geometry and exposure without the noise and blur, which soften the small osteophytes and joint-space
# edges that the KL1 and KL2 calls hinge on.
POLICIES.add("strong_sharp", replace(_STRONG, noise=0.0, blur_p=0.0))
# Self-supervised views (`kneeoa.models.cnn.ssl`): zoom up to 1.6x (a crop of 62 % of the side) and larger shifts, so
# two views share only part of the joint, with wide exposure changes, more noise and blur; rotations stay small.
POLICIES.add("ssl", Policy(degrees=10.0, scale=(0.9, 1.6), translate=0.1, gamma=(0.5, 2.0), contrast=(0.6, 1.4),
                           brightness=0.15, noise=0.04, blur_p=0.5))


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def intensity_lut(b: int, policy: Policy, generator: torch.Generator | None) -> torch.Tensor:
    """(b, 256) lookup tables mapping uint8 grey levels to float intensity: gamma, then contrast and brightness."""
    levels = torch.linspace(0, 1, 256).clamp(min=1e-4)[None, :]
    gamma = _uniform(b, *policy.gamma, generator)[:, None]
    contrast = _uniform(b, *policy.contrast, generator)[:, None]
    bright = _uniform(b, -policy.brightness, policy.brightness, generator)[:, None]
    return ((levels**gamma - 0.5) * contrast + 0.5 + bright).clamp(0, 1)


def affine_grid(theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`F.affine_grid(theta, (B, 1, H, W), align_corners=False)`, some 50x faster on CPU.

    An affine map is separable: the sampling point of output pixel (row, col) is a row term plus a column term. The
    grid is built as one contiguous broadcast sum in (B, 2, H, W) layout and handed over as a permuted view, which
    `grid_sample` reads directly.
    """
    h, w = size
    ys = (torch.arange(h, dtype=theta.dtype) * 2 + 1) / h - 1
    xs = (torch.arange(w, dtype=theta.dtype) * 2 + 1) / w - 1
    row_terms = theta[:, :, 1, None] * ys + theta[:, :, 2, None]
    col_terms = theta[:, :, 0, None] * xs
    return (row_terms[:, :, :, None] + col_terms[:, :, None, :]).permute(0, 2, 3, 1)


def pixel_matrices(theta: torch.Tensor, size: tuple[int, int], row0: int = 0) -> np.ndarray:
    """(B, 2, 3) float64 maps from output pixel (column, row - `row0`) to source pixel (x, y), for `cv2.warpAffine`
    with `WARP_INVERSE_MAP`: the same sampling points as `F.grid_sample(x, affine_grid(theta, size),
    align_corners=False)`, whose `theta` works in normalised [-1, 1] coordinates."""
    h, w = size
    t = theta.double().numpy()
    m = np.empty_like(t)
    m[:, 0, 0], m[:, 0, 1] = t[:, 0, 0], t[:, 0, 1] * w / h
    m[:, 1, 0], m[:, 1, 1] = t[:, 1, 0] * h / w, t[:, 1, 1]
    u0, v0 = 1 / w - 1, (2 * row0 + 1) / h - 1  # normalised centre of output pixel (0, row0)
    m[:, 0, 2] = (t[:, 0, 0] * u0 + t[:, 0, 1] * v0 + t[:, 0, 2] + 1) * w / 2 - 0.5
    m[:, 1, 2] = (t[:, 1, 0] * u0 + t[:, 1, 1] * v0 + t[:, 1, 2] + 1) * h / 2 - 0.5
    return m


def _cv2():
    """OpenCV, held to one thread: its per-image calls here are too small to split, and splitting them competes with
    the training step's own threads."""
    import cv2

    cv2.setNumThreads(1)
    return cv2


def augment_batch(x: torch.Tensor, policy: Policy, *, hflip: bool, generator: torch.Generator | None = None,
                  noise_bank: torch.Tensor | None = None, mean: float = 0.0, std: float = 1.0,
                  rows: tuple[int, int] | None = None, group: int = 1) -> torch.Tensor:
    """Augment a batch of uint8 images; returns float images in [0, 1], normalised as `(image - mean) / std`.

    The random draws are made for the whole batch at once (torch generator); the pixels are then worked image by
    image with OpenCV on one core, which on a small CPU costs about half of the same work as whole-batch torch ops
    (`bench/train_throughput.py`): the uint8 image is warped (rotation, scale, shift, optional flip; bilinear, edges
    replicated, as `grid_sample` with border padding), then one 256-entry table per image maps the warped grey
    levels to float intensity (gamma, contrast, brightness, with the normalisation folded in), noise from a bank of
    fields is added, a share of images is blurred, and the result is clamped into the output.

    Args:
        x: (B, 1, H, W) uint8.
        policy: ranges to draw from.
        hflip: also flip half of the images left-right (off for mirrored data: it would undo the mirroring).
        generator: CPU random generator (seeded by the caller for reproducibility).
        noise_bank: (N >= B, 1, H, W) float32 unit Gaussian noise fields; a random run of B of them is used
            (default: drawn here, per call).
        mean, std: normalisation of the output.
        rows: (top, bottom): compute only output rows [top, bottom), the rows a network reads
            (`TwoBranchNet.input_rows`), and fill the others with black. Those rows match the same rows of a
            whole-image call with the same generator (the same random draws; one row more each side is warped so the
            blur matches; OpenCV's fixed-point sampling may round a grey level the other way), at a fraction of the
            cost.
        group: consecutive images (1-4) that share one geometric draw (rotation, scale, shift, flip) and are warped
            together as the channels of one image: OpenCV's bilinear warp vectorises across channels, so a batch's
            warps cost about a third less. Each image's own distribution of draws is unchanged; only images that sit
            side by side in a batch (random ones, from a shuffled sampler) move alike. Intensity, noise and blur stay
            drawn per image.
    """
    if not 1 <= group <= 4:
        raise ValueError(f"group must be 1-4 images per geometric draw (OpenCV channels); got {group}.")
    cv2 = _cv2()
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    top, bottom = rows or (0, h)
    lo, hi = (max(top - 1, 0), min(bottom + 1, h)) if rows else (0, h)
    lut = standardise(intensity_lut(b, policy, generator), mean, std).numpy()
    n_geo = -(-b // group)  # geometric draws: one per group of batch neighbours
    angle = _uniform(n_geo, -policy.degrees, policy.degrees, generator) * math.pi / 180
    scale = _uniform(n_geo, *policy.scale, generator)
    flip = torch.where(torch.rand(n_geo, generator=generator) < 0.5, -1.0, 1.0) if hflip else torch.ones(n_geo)
    shift = _uniform(2 * n_geo, -policy.translate, policy.translate, generator).view(n_geo, 2) * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    maps = pixel_matrices(theta, (h, w), lo)
    noise, amps = None, None
    if policy.noise:
        if noise_bank is None or noise_bank.shape[1:] != x.shape[1:] or len(noise_bank) < b:
            noise_bank = torch.randn((2 * b, *x.shape[1:]), generator=generator)
        start = int(torch.randint(0, len(noise_bank) - b + 1, (1,), generator=generator))
        noise = noise_bank[start:start + b, 0, lo:hi].numpy()
        amps = _uniform(b, 0, policy.noise / std, generator).tolist()
    blurred = (torch.rand(b, generator=generator) < policy.blur_p).tolist() if policy.blur_p else [False] * b
    src = np.ascontiguousarray(x.numpy()[:, 0])
    out = torch.empty((b, 1, h, w))
    band = out.numpy()[:, 0, lo:hi]  # each image's band is contiguous: OpenCV writes it in place
    flags, border, size = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, cv2.BORDER_REPLICATE, (w, hi - lo)
    for k, first in enumerate(range(0, b, group)):
        images = src[first:first + group]
        warped = cv2.warpAffine(images[0] if len(images) == 1 else cv2.merge(list(images)), maps[k], size,
                                flags=flags, borderMode=border)
        for i, plane in enumerate((warped,) if len(images) == 1 else cv2.split(warped), first):
            cv2.LUT(plane, lut[i], dst=band[i])
            if noise is not None:
                cv2.scaleAdd(noise[i], amps[i], band[i], dst=band[i])
            if blurred[i]:
                cv2.GaussianBlur(band[i], (3, 3), 0, dst=band[i], borderType=border)
    black = standardise(0.0, mean, std)
    if noise is not None:  # the tables keep intensities in range; noise can push them out
        out[:, :, top:bottom].clamp_(black, standardise(1.0, mean, std))
    out[:, :, :top] = out[:, :, bottom:] = black
    return out


@dataclass
class BatchTransform:
    """collate_fn of the training and validation loaders: a cached uint8 batch -> the network's float input.

    Augments (when `policy` is set), normalises (with the CNN's `Preprocess`, the one its checkpoint stores) and sets
    the memory format of a batch from `kneeoa.transforms.dataset.KneeDataset`. It runs wherever the DataLoader runs
    it: in a worker process when `num_workers` > 0, so that the next batch is augmented while the model steps on this
    one. Random draws use the process's torch generator, which the DataLoader seeds per worker from its own seeded
    generator, so a run is reproducible for a given seed and worker count.
    """

    pre: Preprocess
    policy: Policy | None = None
    hflip: bool = False
    channels_last: bool = False
    rows: tuple[int, int] | None = None  # the input rows the network reads; only those are augmented
    group: int = 1  # consecutive images that share one geometric draw (`augment_batch`)
    noise: torch.Tensor | None = field(default=None, repr=False)  # noise fields, drawn once per process

    def __call__(self, batch: tuple[torch.Tensor, dict[str, torch.Tensor]]):
        x, y = batch
        if self.policy is None:
            x = self.pre.from_uint8(x)
        else:
            if self.noise is None and self.policy.noise:
                self.noise = torch.randn((2 * len(x), *x.shape[1:]))
            # a CNN's input has one mean and std (`Preprocess.for_cnn`): augmentation folds them into its tables
            x = augment_batch(x, self.policy, hflip=self.hflip, noise_bank=self.noise, mean=self.pre.mean[0],
                              std=self.pre.std[0], rows=self.rows, group=self.group)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y


def tta_views(x: torch.Tensor) -> list[torch.Tensor]:
    """Deterministic test-time views of a batch (B, 1, H, W): itself, two small zooms and four 3 % shifts.

    No flips: with mirrored data every knee already has one orientation.
    """
    views = [x]
    b = x.shape[0]
    for scale, dx, dy in ((0.94, 0, 0), (1.06, 0, 0), (1, 0.06, 0), (1, -0.06, 0), (1, 0, 0.06), (1, 0, -0.06)):
        theta = torch.tensor([[1 / scale, 0, dx], [0, 1 / scale, dy]], dtype=x.dtype).expand(b, 2, 3)
        views.append(F.grid_sample(x, affine_grid(theta, x.shape[-2:]), mode="bilinear", padding_mode="border",
                                   align_corners=False))
    return views
