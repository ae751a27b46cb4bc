"""Patient-level bootstrap: resample weights, percentile intervals, paired comparisons and ROC bands.

All functions are pure: arrays in, arrays or floats out, randomness passed in as a `numpy.random.Generator`.

The unit of resampling is the patient (DESIGN.md: "the patient is the unit of independence"). A bootstrap
resample draws patients with replacement; every image of a drawn patient enters with the patient's multiplicity.
Rather than materialising B resampled tables, a resample is a weight vector over images (the number of times the
image's patient was drawn), and each metric's weighted form (`kneeoa.stats.weighted`, attached to its entry in
`kneeoa.stats.metrics.METRICS`) is evaluated for all B resamples at once.

Intervals are percentile intervals (Efron & Tibshirani 1993, ch. 13) of the bootstrap distribution; resamples where
a metric is undefined (e.g. AUC with one class drawn) are dropped. Paired differences between arms use the same
resamples for both arms. Tests of AUC differences (DeLong) and the multiplicity correction are in
`kneeoa.stats.comparisons`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kneeoa.errors import ConfigError
from kneeoa.stats.weighted import PointFn, WeightedFn, div


def patient_codes(patient_ids) -> tuple[np.ndarray, int]:
    """Integer code per image for its patient, and the number of patients.

    Args:
        patient_ids: (n_images,) patient id per image, any hashable dtype.

    Returns:
        codes: (n_images,) int64 in [0, n_patients); n_patients.
    """
    _, codes = np.unique(np.asarray(patient_ids).astype(str), return_inverse=True)
    return codes.astype(np.int64), int(codes.max()) + 1 if len(codes) else 0


def bootstrap_weights(codes: np.ndarray, n_patients: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Image weights of `n_boot` patient-level bootstrap resamples.

    Each resample draws `n_patients` patients with replacement; an image's weight is the number of times its patient
    was drawn, so a metric evaluated with these weights equals the metric on the resampled table.

    Args:
        codes: (n_images,) patient code per image (from `patient_codes`).
        n_patients: number of distinct patients.
        n_boot: number of resamples.
        rng: the source of randomness.

    Returns:
        (n_boot, n_images) float64 weights.
    """
    if n_boot < 1:
        raise ConfigError(f"stats.n_boot must be a positive number of bootstrap resamples. Got {n_boot}.")
    draws = rng.integers(0, n_patients, size=(n_boot, n_patients))
    counts = np.zeros((n_boot, n_patients))
    np.add.at(counts, (np.repeat(np.arange(n_boot), n_patients), draws.ravel()), 1.0)
    return counts[:, codes]


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Equal-tailed percentile interval of the finite values of `samples` (NaN, NaN when there are none)."""
    if not 0 < confidence < 1:
        raise ConfigError(f"stats.confidence must be between 0 and 1 (e.g. 0.95). Got {confidence}.")
    finite = np.asarray(samples, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return float("nan"), float("nan")
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(finite, [alpha, 1 - alpha])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval."""

    value: float
    low: float
    high: float


def _with_pred(pred: np.ndarray | None) -> dict:
    return {} if pred is None else {"pred": pred}


def bootstrap_ci(y: np.ndarray, probs: np.ndarray, weights: np.ndarray, *, point: PointFn, weighted: WeightedFn,
                 confidence: float = 0.95, pred: np.ndarray | None = None) -> Interval:
    """Full-sample point estimate and patient-bootstrap percentile CI of one metric.

    Args:
        y: (n,) int true classes.
        probs: (n, K) float class probabilities.
        weights: (B, n) resample weights from `bootstrap_weights`.
        point: the point metric (e.g. `kneeoa.stats.metrics.METRICS.get("auc").fn`): gives `value`.
        weighted: its weighted form (e.g. `METRICS.get("auc").weighted_fn`): gives the interval.
        confidence: interval coverage.
        pred: (n,) the arm's decoded classes (prediction table `y_pred`); None: argmax of `probs`.

    Example:
        >>> from kneeoa.stats.metrics import METRICS
        >>> rng = np.random.default_rng(0)
        >>> y = np.array([0, 1, 0, 1]); p = np.array([[.8, .2], [.3, .7], [.6, .4], [.1, .9]])
        >>> w = bootstrap_weights(np.arange(4), 4, 200, rng)
        >>> ci = bootstrap_ci(y, p, w, point=METRICS.get("accuracy").fn, weighted=METRICS.get("accuracy").weighted_fn)
        >>> ci.value
        1.0
    """
    lo, hi = percentile_interval(weighted(y, probs, weights, **_with_pred(pred)), confidence)
    return Interval(float(point(y, probs, **_with_pred(pred))), lo, hi)


@dataclass(frozen=True)
class Comparison:
    """Arm A minus arm B on the same images: difference, its CI and a two-sided p-value."""

    difference: float
    low: float
    high: float
    p_value: float
    method: str


def paired_bootstrap(y: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, weights: np.ndarray, *,
                     point: PointFn, weighted: WeightedFn, confidence: float = 0.95,
                     pred_a: np.ndarray | None = None, pred_b: np.ndarray | None = None) -> Comparison:
    """Paired patient-bootstrap comparison of one metric between two arms scored on the same images.

    The same resamples weight both arms. The interval is the percentile interval of the resampled differences; the
    p-value tests "no difference" against the bootstrap distribution shifted to zero (Hall & Wilson 1991):
    p = (1 + #{|d_b - d| >= |d|}) / (1 + B).

    Args:
        y: (n,) true classes; probs_a, probs_b: (n, K) probabilities of the two arms, rows aligned with `y`.
        weights: (B, n) resample weights.
        pred_a, pred_b: the arms' decoded classes (prediction table `y_pred`); None: argmax of the probabilities.
    """
    d = float(point(y, probs_a, **_with_pred(pred_a)) - point(y, probs_b, **_with_pred(pred_b)))
    diffs = weighted(y, probs_a, weights, **_with_pred(pred_a)) - weighted(y, probs_b, weights, **_with_pred(pred_b))
    diffs = diffs[np.isfinite(diffs)]
    lo, hi = percentile_interval(diffs, confidence)
    if not np.isfinite(d) or diffs.size == 0:
        return Comparison(d, lo, hi, float("nan"), "paired patient bootstrap")
    p = (1 + np.sum(np.abs(diffs - d) >= abs(d) - 1e-12)) / (1 + diffs.size)
    return Comparison(d, lo, hi, float(min(p, 1.0)), "paired patient bootstrap")


def roc_band(y: np.ndarray, score: np.ndarray, weights: np.ndarray, *, fpr_grid: np.ndarray | None = None,
             confidence: float = 0.95) -> dict[str, np.ndarray]:
    """Empirical ROC curve and a pointwise percentile band of TPR at fixed FPRs over patient resamples.

    Args:
        y: (n,) bool/0-1 labels; score: (n,) scores; weights: (B, n) resample weights.
        fpr_grid: (G,) FPR values (default 101 points on [0, 1]).

    Returns:
        dict with "fpr" (G,), "tpr" (G,) full-sample curve (interpolated), "tpr_low", "tpr_high" (G,).
    """
    grid = np.linspace(0, 1, 101) if fpr_grid is None else np.asarray(fpr_grid, dtype=float)
    y = np.asarray(y).astype(bool)
    order = np.argsort(-np.asarray(score), kind="mergesort")
    s = np.asarray(score)[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]

    def curves(w: np.ndarray) -> np.ndarray:
        ws = w[:, order]
        tp = np.cumsum(ws * y[order], axis=1)[:, last_of_tie]
        fp = np.cumsum(ws * ~y[order], axis=1)[:, last_of_tie]
        tpr = np.c_[np.zeros(len(w)), div(tp, tp[:, -1:])]
        fpr = np.c_[np.zeros(len(w)), div(fp, fp[:, -1:])]
        out = np.full((len(w), len(grid)), np.nan)
        for b in range(len(w)):
            if np.isfinite(tpr[b]).all() and np.isfinite(fpr[b]).all():
                # at an FPR shared by several points np.interp takes the last one, i.e. the highest TPR
                out[b] = np.interp(grid, fpr[b], tpr[b], left=0, right=1)
        return out

    full = curves(np.ones((1, len(y))))[0]
    boot = curves(weights)
    boot = boot[np.isfinite(boot).all(axis=1)]
    alpha = (1 - confidence) / 2
    if len(boot):
        lo, hi = np.quantile(boot, [alpha, 1 - alpha], axis=0)
    else:
        lo = hi = np.full(len(grid), np.nan)
    return {"fpr": grid, "tpr": full, "tpr_low": lo, "tpr_high": hi}
