"""Mixup of training batches (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization").

Each image is blended with another image of the same batch, x' = lam x + (1 - lam) x[perm] with one lam ~ Beta(a, a)
per batch, and the loss is the same blend of the losses against the two images' labels. It regularises a network
that keeps lowering its training loss without gaining on val (on kneeKL224 a single two-branch network grades no
better after 120 epochs than after 60). Any head's loss works unchanged, CORN's included, since the labels are not
mixed, only the two losses.

The draws come from torch's global generator, which Lightning seeds per member, so a run repeats.
"""

from __future__ import annotations

import torch


def mix_batch(x: torch.Tensor, y: dict[str, torch.Tensor], alpha: float
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None, float]:
    """(mixed images, the mates' labels, lam); with `alpha` 0, the batch unchanged, None and 1.0."""
    if not alpha:
        return x, None, 1.0
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(x))
    mixed = x.mul(lam).add_(x[perm], alpha=1.0 - lam)
    return mixed, {t: labels[perm] for t, labels in y.items()}, lam
