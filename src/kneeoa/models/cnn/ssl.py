"""Self-supervised pretraining pieces (SimCLR): two augmented views per image, a projection head, the NT-Xent loss.

SimCLR (Chen et al. 2020, arXiv:2002.05709) was chosen over BYOL, MoCo-v2 and DINO because it has no momentum
encoder, queue or teacher to keep in step: one network, one loss, one optimizer, which makes a run that is killed
and resumed exactly what it was. Its known weakness, the need for many negatives, matters less here: on two CPU
cores a batch of 256 knees (510 negatives per view) is what the two-branch CNN can afford anyway, and the knees of
one data set are alike enough that the loss keeps learning at that size (docs/ssl.md).

The pieces are implemented here (about 60 lines) rather than taken from `lightly`: that library pulls a second copy
of PyTorch Lightning and `hydra-core` into the environment for a loss and a two-layer head.

Views come from the batch augmentation of the CNN arms (`kneeoa.transforms.augment`, policy `ssl`): zoom/crop, small
rotations, shifts, gamma, contrast, brightness, noise and blur; no colour jitter (radiographs are grayscale) and no
flips (mirrored knees share one orientation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kneeoa.models.cnn.backbones import input_rows
from kneeoa.transforms.augment import Policy, augment_batch


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over a batch of positive pairs.

    Row i of `z1` and row i of `z2` are two views of one image (the positive pair); every other row of both is a
    negative. Each of the 2B views is classified among the 2B - 1 others by cosine similarity / temperature, and
    the loss is the mean cross-entropy of picking its partner.

    Args:
        z1, z2: (B, D) projections of the two views (any scale: they are L2-normalised here).
        temperature: softmax temperature (SimCLR uses 0.1-0.5).

    Returns:
        Scalar loss. With B pairs it is at least 0 (perfect) and log(2B - 1) for embeddings that carry no
        information about which views belong together.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent takes two (B, D) tensors of one shape; got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}.")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # a view is never its own candidate
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, partner)


class ProjectionHead(nn.Module):
    """SimCLR's MLP head (Linear-BN-ReLU-Linear) on the backbone's features; discarded after pretraining."""

    def __init__(self, in_dim: int, hidden: int = 256, out_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SimCLR(nn.Module):
    """A headless backbone (`num_features`) with a projection head; `forward(views) -> projections`."""

    def __init__(self, backbone: nn.Module, hidden: int = 256, out_dim: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = ProjectionHead(backbone.num_features, hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def two_views(x: torch.Tensor, policy: Policy, *, mean: float, std: float, generator: torch.Generator | None = None,
              rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent augmentations of a uint8 batch (B, 1, H, W), normalised as the backbone expects; only the
    `rows` the backbone reads are computed (`augment_batch`)."""
    return tuple(augment_batch(x, policy, hflip=False, generator=generator, mean=mean, std=std, rows=rows)
                 for _ in range(2))  # type: ignore[return-value]


def simclr_step(model: SimCLR, x: torch.Tensor, policy: Policy, *, mean: float, std: float, temperature: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The loss of one batch: both views through the network in one pass (shared batch-norm statistics)."""
    v1, v2 = two_views(x, policy, mean=mean, std=std, generator=generator,
                       rows=input_rows(model.backbone, x.shape[-2]))
    z = model(torch.cat([v1, v2]))
    return nt_xent(z[:len(x)], z[len(x):], temperature)
