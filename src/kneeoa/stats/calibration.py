"""Calibration: expected calibration error, Brier score and reliability-diagram data.

Both are losses (lower is better), reported as metrics `ece` and `brier` next to the discrimination metrics.

Definitions (the paper reports no calibration; these follow Guo et al. 2017 and Brier 1950):

* **Confidence and outcome.** Binary tasks use the probability of the positive class, `prob_1`, against the
  outcome `y_true == 1` (the reliability of "feature present"). Multiclass tasks (KLG) use the *top label*: the
  confidence is the largest class probability and the outcome is whether that class is the true one.
* **ECE** with `n_bins` equal-width bins on [0, 1] (the last bin includes 1.0):
  ECE = sum_b (n_b / n) |mean outcome_b - mean confidence_b| = sum_b |sum_{i in b} (outcome_i - conf_i)| / n.
* **Brier score.** Binary: mean (prob_1 - y)^2, in [0, 1]. Multiclass: mean over images of the sum over classes
  of (prob_k - [y == k])^2, in [0, 2] (Brier's original definition).

Every function has a weighted form for the patient bootstrap (weights (B, n), see `kneeoa.stats`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kneeoa.errors import ConfigError


def confidence_and_outcome(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, outcome) per image: prob_1 and y==1 for binary tasks, top-label for multiclass ones."""
    y, probs = np.asarray(y), np.asarray(probs, dtype=float)
    if probs.shape[1] == 2:
        return probs[:, 1], (y == 1).astype(float)
    return probs.max(axis=1), (probs.argmax(axis=1) == y).astype(float)


def bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each confidence in [0, 1]; 1.0 falls in the last bin."""
    if n_bins < 1:
        raise ConfigError(f"stats.calibration_bins must be a positive number of bins. Got {n_bins}.")
    return np.minimum((np.asarray(confidence) * n_bins).astype(np.int64), n_bins - 1)


def weighted_ece(y: np.ndarray, probs: np.ndarray, w: np.ndarray, *, n_bins: int = 10) -> np.ndarray:
    """ECE under each row of weights (B, n) -> (B,)."""
    conf, outcome = confidence_and_outcome(y, probs)
    onehot = np.zeros((len(conf), n_bins))
    onehot[np.arange(len(conf)), bin_index(conf, n_bins)] = 1.0
    gap = w @ (onehot * (outcome - conf)[:, None])
    total = w.sum(axis=1)
    return np.where(total > 0, np.abs(gap).sum(axis=1) / np.where(total > 0, total, 1), np.nan)


def ece(y: np.ndarray, probs: np.ndarray, *, n_bins: int = 10) -> float:
    """Expected calibration error with equal-width bins (see the module docstring for binary vs multiclass).

    Args:
        y: (n,) int true classes.
        probs: (n, K) class probabilities.
        n_bins: number of equal-width confidence bins.

    Example:
        >>> ece(np.array([1, 0]), np.array([[0.2, 0.8], [0.6, 0.4]]), n_bins=10)
        0.3
    """
    return float(weighted_ece(y, probs, np.ones((1, len(y))), n_bins=n_bins)[0])


def _squared_error(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=float)
    if probs.shape[1] == 2:
        return (probs[:, 1] - (np.asarray(y) == 1)) ** 2
    onehot = np.eye(probs.shape[1])[np.asarray(y)]
    return ((probs - onehot) ** 2).sum(axis=1)


def weighted_brier(y: np.ndarray, probs: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Brier score under each row of weights (B, n) -> (B,)."""
    total = w.sum(axis=1)
    return np.where(total > 0, (w @ _squared_error(y, probs)) / np.where(total > 0, total, 1), np.nan)


def brier(y: np.ndarray, probs: np.ndarray) -> float:
    """Brier score: binary mean (prob_1 - y)^2; multiclass mean sum over classes of squared differences.

    Example:
        >>> brier(np.array([1, 0]), np.array([[0.2, 0.8], [0.6, 0.4]]))
        0.1
    """
    return float(np.mean(_squared_error(y, probs)))


def reliability_table(y: np.ndarray, probs: np.ndarray, *, n_bins: int = 10) -> pd.DataFrame:
    """Reliability-diagram data: one row per non-empty bin.

    Returns:
        DataFrame with columns bin, bin_low, bin_high, n, confidence (mean), observed (mean outcome).
    """
    conf, outcome = confidence_and_outcome(y, probs)
    b = bin_index(conf, n_bins)
    n = np.bincount(b, minlength=n_bins)
    keep = n > 0
    edges = np.linspace(0, 1, n_bins + 1)
    mean = lambda v: np.bincount(b, weights=v, minlength=n_bins)[keep] / n[keep]  # noqa: E731
    return pd.DataFrame({"bin": np.arange(n_bins)[keep], "bin_low": edges[:-1][keep], "bin_high": edges[1:][keep],
                         "n": n[keep], "confidence": mean(conf), "observed": mean(outcome)})


#: The calibration losses `calibration_metrics` returns (lower is better), as named in the metrics tables.
CALIBRATION_METRICS = ("ece", "brier")


def calibration_metrics(n_bins: int):
    """{"ece": (point, weighted), "brier": (point, weighted)} with `n_bins` bound, for
    `kneeoa.stats.bootstrap.bootstrap_ci`."""
    bin_index(np.zeros(1), n_bins)  # validates n_bins once, with the config's name in the message
    return {
        "ece": (lambda y, p: ece(y, p, n_bins=n_bins), lambda y, p, w: weighted_ece(y, p, w, n_bins=n_bins)),
        "brier": (brier, weighted_brier),
    }
