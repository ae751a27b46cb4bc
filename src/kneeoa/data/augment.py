"""Training-time augmentation of whole batches, on the tensor, in one vectorised pass.

Per-image PIL/torchvision transforms cost more than a small CNN's step on two CPU cores. Here the intensity changes
that matter for radiographs -- gamma (exposure curve), contrast and brightness -- are one 256-entry lookup table per
image applied to the uint8 grey levels, one `affine_grid` + `grid_sample` call moves the whole batch (rotation,
scale, shift, optional flip), then Gaussian noise (from a bank of noise fields) and a light blur on a random share.
No colour jitter: radiographs are grayscale. For a network that reads only a band of rows (the two-branch net reads
the middle half) only that band is warped, noised and blurred (`rows`), which saves a third of the transform.

Policies are registry entries (`cnn.augment_policy`): `standard` is mild geometry and contrast; `strong` is the
Tiulpin et al. 2018 family (larger rotations, gamma, noise, blur), for training small networks from scratch; `ssl`
makes the two views of self-supervised pretraining.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kneeoa.registry import Registry


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
POLICIES.add("strong", Policy(degrees=10.0, scale=(0.9, 1.1), translate=0.05, gamma=(0.6, 1.6), contrast=(0.8, 1.25),
                              brightness=0.08, noise=0.02, blur_p=0.2))
# Self-supervised views (`kneeoa.models.ssl`): zoom up to 1.6x (a crop of 62 % of the side) and larger shifts, so two
# views share only part of the joint, with wide exposure changes, more noise and blur; rotations stay small.
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


def normalise(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 (B, 1, S, S) -> normalised float32, the one conversion training and inference share."""
    return (x.float() / 255.0 - mean) / std


def affine_grid(theta: torch.Tensor, size: tuple[int, int], rows: tuple[int, int] | None = None) -> torch.Tensor:
    """`F.affine_grid(theta, (B, 1, H, W), align_corners=False)`, some 50x faster on CPU; only output rows
    [rows[0], rows[1]) when `rows` is given.

    An affine map is separable: the sampling point of output pixel (row, col) is a row term plus a column term. The
    grid is built as one contiguous broadcast sum in (B, 2, H, W) layout and handed over as a permuted view, which
    `grid_sample` reads directly.
    """
    h, w = size
    top, bottom = rows or (0, h)
    ys = (torch.arange(top, bottom, dtype=theta.dtype) * 2 + 1) / h - 1
    xs = (torch.arange(w, dtype=theta.dtype) * 2 + 1) / w - 1
    row_terms = theta[:, :, 1, None] * ys + theta[:, :, 2, None]
    col_terms = theta[:, :, 0, None] * xs
    return (row_terms[:, :, :, None] + col_terms[:, :, None, :]).permute(0, 2, 3, 1)


def blur3(x: torch.Tensor) -> torch.Tensor:
    """3x3 binomial blur ([1, 2, 1] x [1, 2, 1] / 16, edges replicated) of (B, 1, H, W), as two separable passes."""
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")
    x = x[..., :-2] + 2 * x[..., 1:-1] + x[..., 2:]
    return (x[..., :-2, :] + 2 * x[..., 1:-1, :] + x[..., 2:, :]) / 16


def augment_batch(x: torch.Tensor, policy: Policy, *, hflip: bool, generator: torch.Generator | None = None,
                  noise_bank: torch.Tensor | None = None, mean: float = 0.0, std: float = 1.0,
                  rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Augment a batch of uint8 images; returns float images in [0, 1], normalised as `(image - mean) / std`.

    Intensity changes are one per-image 256-entry lookup table applied to the grey levels (cheaper than computing a
    power over every pixel), then one resampling moves the whole batch. The normalisation is folded into the table,
    the noise amplitude and the final clamp (every later step is linear), so it costs no pass of its own.

    Args:
        x: (B, 1, H, W) uint8.
        policy: ranges to draw from.
        hflip: also flip half of the images left-right (off for mirrored data: it would undo the mirroring).
        generator: CPU random generator (seeded by the caller for reproducibility).
        noise_bank: (N >= B, 1, H, W) unit Gaussian noise fields; a random run of B of them is used (default:
            drawn here, per call).
        mean, std: normalisation of the output.
        rows: (top, bottom): compute only output rows [top, bottom), the rows a network reads
            (`TwoBranchNet.input_rows`), and fill the others with black. Those rows equal the same rows of a
            whole-image call with the same generator (the same random draws; one row more each side is warped so the
            blur matches), at a fraction of the cost.
    """
    b, h = x.shape[0], x.shape[-2]
    top, bottom = rows or (0, h)
    lo, hi = (max(top - 1, 0), min(bottom + 1, h)) if rows else (0, h)
    lut = (intensity_lut(b, policy, generator) - mean) / std
    x = torch.gather(lut, 1, x.reshape(b, -1).long()).view(x.shape)
    angle = _uniform(b, -policy.degrees, policy.degrees, generator) * math.pi / 180
    scale = _uniform(b, *policy.scale, generator)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0) if hflip else torch.ones(b)
    shift = _uniform(2 * b, -policy.translate, policy.translate, generator).view(b, 2) * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    shape = x.shape
    x = F.grid_sample(x, affine_grid(theta, shape[-2:], (lo, hi)), mode="bilinear", padding_mode="border",
                      align_corners=False)
    if policy.noise:
        if noise_bank is None or noise_bank.shape[1:] != shape[1:] or len(noise_bank) < b:
            noise_bank = torch.randn((2 * b, *shape[1:]), generator=generator)
        start = int(torch.randint(0, len(noise_bank) - b + 1, (1,), generator=generator))
        x.addcmul_(_uniform(b, 0, policy.noise / std, generator).view(b, 1, 1, 1),
                   noise_bank[start:start + b, :, lo:hi])
    if policy.blur_p:
        pick = torch.nonzero(torch.rand(b, generator=generator) < policy.blur_p).flatten()
        if len(pick):
            x[pick] = blur3(x[pick])
    x = x.clamp_(-mean / std, (1 - mean) / std)
    if not rows:
        return x
    out = x.new_full(shape, -mean / std)
    out[:, :, top:bottom] = x[:, :, top - lo:bottom - lo]
    return out


@dataclass
class BatchTransform:
    """collate_fn of the training and validation loaders: a cached uint8 batch -> the network's float input.

    Augments (when `policy` is set), normalises and sets the memory format of a batch from
    `kneeoa.data.dataset.KneeDataset`. It runs wherever the DataLoader runs it: in a worker process when
    `num_workers` > 0, so that the next batch is augmented while the model steps on this one. Random draws use the
    process's torch generator, which the DataLoader seeds per worker from its own seeded generator, so a run is
    reproducible for a given seed and worker count.
    """

    mean: float
    std: float
    policy: Policy | None = None
    hflip: bool = False
    channels_last: bool = False
    rows: tuple[int, int] | None = None  # the input rows the network reads; only those are augmented
    noise: torch.Tensor | None = field(default=None, repr=False)  # noise fields, drawn once per process

    def __call__(self, batch: tuple[torch.Tensor, dict[str, torch.Tensor]]):
        x, y = batch
        if self.policy is None:
            x = normalise(x, self.mean, self.std)
        else:
            if self.noise is None and self.policy.noise:
                self.noise = torch.randn((2 * len(x), *x.shape[1:]))
            x = augment_batch(x, self.policy, hflip=self.hflip, noise_bank=self.noise, mean=self.mean, std=self.std,
                              rows=self.rows)
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
