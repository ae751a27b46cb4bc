"""Deep mutual learning of an ensemble's networks (Zhang, Xiang, Hospedales & Lu 2018, "Deep Mutual Learning").

With `cnn.mutual` > 0 and `cnn.ensemble_seeds` > 1, the seeds' networks train side by side on the same batches, and
each one's loss gains `cnn.mutual` x KL(q || p): p is its class probabilities, q the mean of the others' (held fixed,
so each network learns from the others and not the other way round through the same term). The others' soft
predictions regularise a network that keeps lowering its training loss without gaining on val, at no extra compute
over training the seeds one after another. The term uses every training image, labelled for the task or not, and the
class probabilities every head ends in, so it works with any head, CORN's included.
"""

from __future__ import annotations

import torch

EPS = 1e-7  # floor of the probabilities inside the logarithms: ordinal heads can put exactly 0 on a grade


def mutual_loss(probs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Sum over networks and tasks of KL(mean of the other networks' probabilities || this network's), averaged over
    the images; `probs` holds each network's {task: (B, K) class probabilities}. Zero for a single network."""
    total = torch.zeros(())
    if len(probs) < 2:
        return total
    for task in probs[0]:
        stacked = torch.stack([p[task].float() for p in probs])  # (N, B, K)
        fixed = stacked.detach()
        summed = fixed.sum(0)
        for i in range(len(probs)):
            q = (summed - fixed[i]) / (len(probs) - 1)
            kl = (q * (q.clamp_min(EPS).log() - stacked[i].clamp_min(EPS).log())).sum(-1)
            total = total + kl.mean()
    return total
