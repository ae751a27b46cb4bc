"""Weighted (vectorised) forms of the point metrics, for the bootstrap.

A bootstrap resample is a weight vector over images (how many times the image's patient was drawn); each form here
evaluates a metric under all B weight vectors at once (matrix products and bincount-style confusion matrices):
`fn(y (n,), probs (n, K), w (B, n), pred=None) -> (B,)`, NaN where undefined. `kneeoa.stats.metrics` attaches each form
to its metric's registry entry; `resampled(fn)` is the slow, obviously correct form (repeat each image by its weight and
call the point metric), used for metrics without a vectorised form and as the reference the tests check against.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: fn(y_true (n,), probs (n, K), weights (B, n), pred=None) -> (B,) metric value under each weighting.
WeightedFn = Callable[..., np.ndarray]
PointFn = Callable[..., float]  # (y, probs, pred=None) -> value


def div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den is not positive (no warnings)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def weighted_binary_auc(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC under each row of weights (ties count one half), NaN where a class has zero weight.

    Args:
        y: (n,) bool or 0/1, positives.
        score: (n,) float scores.
        w: (B, n) non-negative weights.
    """
    y = np.asarray(y).astype(bool)
    order = np.argsort(score, kind="mergesort")
    s, pos = np.asarray(score)[order], y[order]
    ws = w[:, order]
    neg_w = ws * ~pos
    cum = np.cumsum(neg_w, axis=1)
    # Tie groups of equal scores: negatives strictly below the group count 1, inside the group 1/2.
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    ends = np.r_[starts[1:], len(s)] - 1
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(s)]))
    below = np.where(starts[group] > 0, cum[:, np.maximum(starts[group] - 1, 0)], 0.0)
    inside = cum[:, ends[group]] - below
    pos_w = ws * pos
    num = np.sum(pos_w * (below + 0.5 * inside), axis=1)
    return div(num, pos_w.sum(axis=1) * neg_w.sum(axis=1))


def weighted_auc(y: np.ndarray, probs: np.ndarray, w: np.ndarray, pred: np.ndarray | None = None) -> np.ndarray:
    if probs.shape[1] == 2:
        return weighted_binary_auc(y == 1, probs[:, 1], w)
    per_class = [weighted_binary_auc(y == c, probs[:, c], w) for c in np.unique(y)]
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.vstack(per_class), axis=0) if len(per_class) > 1 else np.full(len(w), np.nan)


def weighted_accuracy(y: np.ndarray, probs: np.ndarray, w: np.ndarray, pred: np.ndarray | None = None) -> np.ndarray:
    return div(w @ (_hard(probs, pred) == y), w.sum(axis=1))


def _hard(probs: np.ndarray, pred: np.ndarray | None) -> np.ndarray:
    """The decoded classes when given (the table's y_pred), else the argmax of the probabilities."""
    return probs.argmax(axis=1) if pred is None else np.asarray(pred)


def _recalls(y: np.ndarray, probs: np.ndarray, w: np.ndarray, classes, pred: np.ndarray | None = None) -> np.ndarray:
    pred = _hard(probs, pred)
    return np.vstack([div(w @ ((y == c) & (pred == c)), w @ (y == c)) for c in classes])


def weighted_balanced_accuracy(y: np.ndarray, probs: np.ndarray, w: np.ndarray,
                               pred: np.ndarray | None = None) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.nanmean(_recalls(y, probs, w, np.unique(y), pred), axis=0)


def weighted_sensitivity(y: np.ndarray, probs: np.ndarray, w: np.ndarray, pred: np.ndarray | None = None) -> np.ndarray:
    return _recalls(y, probs, w, [1], pred)[0]


def weighted_specificity(y: np.ndarray, probs: np.ndarray, w: np.ndarray, pred: np.ndarray | None = None) -> np.ndarray:
    return _recalls(y, probs, w, [0], pred)[0]


def weighted_confusion(y: np.ndarray, pred: np.ndarray, n_classes: int, w: np.ndarray) -> np.ndarray:
    """(B, K, K) confusion matrices (rows true, columns predicted) under each row of weights."""
    cell = np.asarray(y) * n_classes + np.asarray(pred)
    onehot = np.zeros((len(cell), n_classes * n_classes))
    onehot[np.arange(len(cell)), cell] = 1.0
    return (w @ onehot).reshape(len(w), n_classes, n_classes)


def weighted_f1_macro(y: np.ndarray, probs: np.ndarray, w: np.ndarray, pred: np.ndarray | None = None) -> np.ndarray:
    cm = weighted_confusion(y, _hard(probs, pred), probs.shape[1], w)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    den = 2 * tp + (cm.sum(axis=1) - tp) + (cm.sum(axis=2) - tp)
    return np.where(den > 0, div(2 * tp, den), 0.0).mean(axis=1)


def weighted_kappa(weighting: str) -> WeightedFn:
    def fn(y: np.ndarray, probs: np.ndarray, w: np.ndarray, pred: np.ndarray | None = None) -> np.ndarray:
        k = probs.shape[1]
        cm = weighted_confusion(y, _hard(probs, pred), k, w)
        i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
        cost = np.abs(i - j) if weighting == "linear" else (i - j) ** 2
        total = np.maximum(cm.sum(axis=(1, 2)), 1e-300)[:, None, None]
        expected = cm.sum(axis=2)[:, :, None] * cm.sum(axis=1)[:, None, :] / total
        return 1 - div(np.sum(cost * cm, axis=(1, 2)), np.sum(cost * expected, axis=(1, 2)))

    return fn


def resampled(point: PointFn) -> WeightedFn:
    """Weighted form of any point metric by brute force: repeat each image by its (integer) weight and call it.

    Used for metrics that have no vectorised form in `WEIGHTED`, and as the reference the vectorised forms are
    tested against.
    """

    def fn(y: np.ndarray, probs: np.ndarray, w: np.ndarray, pred: np.ndarray | None = None) -> np.ndarray:
        idx = np.arange(len(y))
        out = np.empty(len(w))
        for b, row in enumerate(np.rint(w).astype(np.int64)):
            take = np.repeat(idx, row)
            out[b] = (point(y[take], probs[take], **({} if pred is None else {"pred": np.asarray(pred)[take]}))
                      if take.size else np.nan)
        return out

    return fn
