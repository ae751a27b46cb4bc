"""Output heads per task: what the network emits for a task, its loss, and how that becomes class probabilities.

Every head ends in per-class probabilities that sum to 1, so the prediction table stays one format for every arm.

- ``ce``: K logits, (class-weighted, optionally label-smoothed) cross-entropy, softmax. Nominal: it ignores order.
- ``corn``: K-1 logits of the conditional events y > k given y > k-1, the CORN loss (Shi, Cao & Raschka, 2023,
  "Deep neural networks for rank-consistent ordinal regression based on conditional probabilities"). The chain
  rule gives P(y > k) = prod_{j <= k} sigmoid(f_j), monotone by construction, and the class probabilities are its
  differences. Ordinal: a KL3 knee called KL1 costs more than one called KL2.
- ``regression``: one output, the grade itself (smooth-L1 to the true grade). Class probabilities are a discretised
  Gaussian (sd ``REGRESSION_SD``) around the clipped output, so expected-grade decoding and calibration plots work
  as for the other heads; they are a display device, not a calibrated posterior.

Binary tasks always use ``ce``; `cnn.klg_head` chooses the KLG head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from kneeoa.registry import Registry
from kneeoa.transforms.dataset import MISSING_LABEL

REGRESSION_SD = 0.5  # spread of the display probabilities of the regression head, in grades


def class_weights(labels: np.ndarray, n_classes: int, power: float = 1.0) -> torch.Tensor:
    """Inverse-frequency weights raised to `power`, normalised to mean 1 over the classes present (absent classes get
    weight 1).

    `power` 1 balances the classes fully; 0.5 (the square root) is the usual middle way between that and no weights
    (`cnn.class_weight_power`): on kneeKL224's train split full weighting gives KL4 (173 knees) 13 times KL0's
    weight, the square root 3.6 times.
    """
    y = labels[labels != MISSING_LABEL]
    counts = np.bincount(y, minlength=n_classes).astype("float64")
    w = np.ones(n_classes)
    present = counts > 0
    w[present] = (counts[present].sum() / (present.sum() * counts[present])) ** power
    w[present] /= w[present].mean()
    return torch.tensor(w, dtype=torch.float32)


class LossFn(Protocol):
    def __call__(self, out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, smoothing: float) -> torch.Tensor:
        ...


@dataclass(frozen=True)
class Head:
    """A registered output head.

    Attributes:
        name: registry name (`cnn.klg_head` value).
        n_outputs: number of network outputs for a task of K classes.
        loss: (outputs (B, n_outputs), labels (B,) with MISSING_LABEL ignored, class weights (K,), label smoothing)
            -> scalar loss; labels are known to contain at least one non-missing entry.
        probs: outputs (B, n_outputs) -> class probabilities (B, K) summing to 1.
    """

    name: str
    n_outputs: Callable[[int], int]
    loss: LossFn
    probs: Callable[[torch.Tensor, int], torch.Tensor]


HEADS: Registry[Head] = Registry("output head")


def _ce_loss(out, y, weight, smoothing):
    return F.cross_entropy(out, y, weight=weight.to(out.device), ignore_index=MISSING_LABEL,
                           label_smoothing=smoothing)


def _sample_weights(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight.to(y.device)[y.clamp(min=0)]


def corn_loss(out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """CORN loss: for threshold k, binary cross-entropy of y > k on the images with y >= k, averaged over all pairs.

    Class weights weight each image's terms by its true class (the analogue of weighted cross-entropy).
    """
    keep = y != MISSING_LABEL
    out, y = out[keep], y[keep]
    w = _sample_weights(y, weight)
    k = torch.arange(out.shape[1], device=out.device)
    at_risk = (y[:, None] >= k[None, :]).float()  # (B, K-1): image takes part in task k
    target = (y[:, None] > k[None, :]).float()
    if smoothing:
        target = target * (1 - smoothing) + 0.5 * smoothing
    bce = F.binary_cross_entropy_with_logits(out, target, reduction="none")
    weights = at_risk * w[:, None]
    return (bce * weights).sum() / weights.sum().clamp(min=1e-12)


def corn_probs(out: torch.Tensor) -> torch.Tensor:
    """Class probabilities from CORN logits: P(y > k) = prod_{j <= k} sigmoid(f_j), then differences."""
    exceed = torch.cumprod(torch.sigmoid(out.float()), dim=1)  # (B, K-1), non-increasing in k
    ones, zeros = torch.ones_like(exceed[:, :1]), torch.zeros_like(exceed[:, :1])
    surv = torch.cat([ones, exceed, zeros], dim=1)  # P(y > k-1) for k = 0..K
    return (surv[:, :-1] - surv[:, 1:]).clamp(min=0)


def regression_loss(out, y, weight, smoothing=0.0):
    keep = y != MISSING_LABEL
    w = _sample_weights(y[keep], weight)
    per = F.smooth_l1_loss(out[keep, 0].float(), y[keep].float(), reduction="none")
    return (per * w).sum() / w.sum().clamp(min=1e-12)


def regression_probs(out: torch.Tensor, n_classes: int) -> torch.Tensor:
    grade = out.float()[:, :1].clamp(0, n_classes - 1)
    k = torch.arange(n_classes, device=out.device, dtype=torch.float32)[None, :]
    return torch.softmax(-((k - grade) ** 2) / (2 * REGRESSION_SD**2), dim=1)


HEADS.add("ce", Head("ce", lambda k: k, _ce_loss, lambda out, k: torch.softmax(out.float(), dim=1)))
HEADS.add("corn", Head("corn", lambda k: k - 1, corn_loss, lambda out, k: corn_probs(out)))
HEADS.add("regression", Head("regression", lambda k: 1, regression_loss, regression_probs))


# ---------------------------------------------------------------------------------------------------------------
# Decoding: class probabilities -> one class per image.


def expected_grade(probs: np.ndarray) -> np.ndarray:
    """Sum_k k * p_k per row."""
    probs = np.asarray(probs, dtype="float64")
    return probs @ np.arange(probs.shape[1])


def apply_cutpoints(probs: np.ndarray, cuts: list[float]) -> np.ndarray:
    """Grade = number of cut-points the expected grade reaches (cuts ascending, K-1 of them)."""
    return np.searchsorted(np.asarray(cuts, dtype="float64"), expected_grade(probs), side="right").astype("int64")


def _quadratic_kappa(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    cm = np.zeros((k, k))
    np.add.at(cm, (y, pred), 1.0)
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    cost = (i - j) ** 2
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / max(cm.sum(), 1.0)
    den = np.sum(cost * expected)
    return float(1 - np.sum(cost * cm) / den) if den > 0 else 0.0


def tune_cutpoints(y: np.ndarray, probs: np.ndarray, *, rounds: int = 4, grid: int = 101,
                   groups: np.ndarray | None = None, n_boot: int = 0, seed: int = 0,
                   accuracy_weight: float = 0.0) -> list[float]:
    """Cut-points on the expected grade that maximise quadratic kappa against `y` (coordinate search), plus
    `accuracy_weight` x accuracy.

    Kappa alone buys agreement with exact-grade accuracy: its optimum moves the KL0/KL1 cut-point down until many
    KL0 knees are graded KL1, a near miss quadratic kappa barely counts. A small weight on accuracy keeps most of the
    kappa and much of the accuracy argmax has (the trade-off, measured on kneeKL224 val: docs/results.md).

    Starts at the midpoints k + 0.5; each round moves every cut-point, one at a time, to the best of `grid` values
    strictly between its neighbours. Deterministic; ties keep the earlier (lower) value.

    Kappa is flat near its optimum, so one search can land on cut-points that a few knees pulled there. With
    `n_boot` > 0 the search runs on that many bootstrap resamples of the `groups` (patients: a patient's knees are
    drawn together) and each cut-point is the median over them (bagging), which is steadier on unseen knees: on the
    kneeKL224 val set, tuned on half the patients and scored on the other half, it kept kappa and raised accuracy
    by 0.007-0.02 (docs/results.md).
    """
    if n_boot:
        groups = np.asarray(groups if groups is not None else np.arange(len(y)))
        ids, codes = np.unique(groups, return_inverse=True)
        members = [np.flatnonzero(codes == c) for c in range(len(ids))]
        rng = np.random.default_rng(seed)
        y, probs = np.asarray(y), np.asarray(probs)
        draws = []
        for _ in range(n_boot):
            rows = np.concatenate([members[c] for c in rng.integers(0, len(ids), len(ids))])
            draws.append(tune_cutpoints(y[rows], probs[rows], rounds=rounds, grid=grid,
                                        accuracy_weight=accuracy_weight))
        return [float(c) for c in np.median(draws, axis=0)]
    y = np.asarray(y, dtype="int64")
    k = np.asarray(probs).shape[1]
    score = expected_grade(probs)
    cuts = np.arange(k - 1) + 0.5

    def objective(trial: np.ndarray) -> float:
        pred = np.searchsorted(trial, score, side="right")
        return _quadratic_kappa(y, pred, k) + (accuracy_weight * float(np.mean(pred == y)) if accuracy_weight else 0.0)

    best = objective(cuts)
    for _ in range(rounds):
        moved = False
        for i in range(k - 1):
            lo = cuts[i - 1] if i > 0 else -0.01
            hi = cuts[i + 1] if i < k - 2 else k - 0.99
            for c in np.linspace(lo, hi, grid)[1:-1]:
                trial = cuts.copy()
                trial[i] = c
                value = objective(trial)
                if value > best + 1e-12:
                    best, cuts, moved = value, trial, True
        if not moved:
            break
    return [float(c) for c in cuts]


def decode(probs: np.ndarray, decoding: dict | None) -> np.ndarray:
    """Classes from probabilities under a stored decoding: {"method": "argmax"} or {"method": "cutpoints", "cuts"}."""
    method = (decoding or {}).get("method", "argmax")
    if method == "argmax":
        return np.asarray(probs).argmax(axis=1).astype("int64")
    if method == "cutpoints":
        return apply_cutpoints(probs, decoding["cuts"])
    raise ValueError(f"Unknown decoding method {method!r}; expected argmax or cutpoints.")
