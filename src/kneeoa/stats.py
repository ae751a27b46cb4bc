"""Uncertainty for every reported number: patient-level bootstrap CIs, paired tests between arms, Holm correction.

All functions are pure: arrays in, arrays or floats out, randomness passed in as a `numpy.random.Generator`.

The unit of resampling is the patient (DESIGN.md: "the patient is the unit of independence"). A bootstrap
resample draws patients with replacement; every image of a drawn patient enters with the patient's multiplicity.
Rather than materialising B resampled tables, a resample is a weight vector over images (the number of times the
image's patient was drawn), and each metric has a *weighted* form evaluated for all B resamples at once
(matrix products and bincount-style confusion matrices). `resampled(fn)` is the slow, obviously correct form
(expand the weights into repeated indices and call the point metric); the tests check both agree.

Intervals are percentile intervals (Efron & Tibshirani 1993, ch. 13) of the bootstrap distribution; resamples where
a metric is undefined (e.g. AUC with one class drawn) are dropped. Paired differences between arms use the same
resamples for both arms. Binary AUCs are compared with DeLong's test (DeLong et al. 1988), computed with the
midrank algorithm of Sun & Xu (2014) and, when patient ids are given, with the clustered variance of
Obuchowski (1997) so that two knees or several visits of one patient are not counted as independent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from kneeoa.errors import ConfigError
from kneeoa.metrics import METRICS
from kneeoa.registry import Registry

#: fn(y_true (n,), probs (n, K), weights (B, n)) -> (B,) metric value under each weighting.
WeightedFn = Callable[..., np.ndarray]  # (y, probs, w, pred=None) -> (B,) values
PointFn = Callable[..., float]  # (y, probs, pred=None) -> value


# --------------------------------------------------------------------------------------------------------------
# Resampling patients
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Weighted (vectorised) forms of the registered metrics
# --------------------------------------------------------------------------------------------------------------

WEIGHTED: Registry[WeightedFn] = Registry("weighted metric")


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
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
    return _div(num, pos_w.sum(axis=1) * neg_w.sum(axis=1))


@WEIGHTED.register("auc")
def _w_auc(y: np.ndarray, probs: np.ndarray, w: np.ndarray, pred: np.ndarray | None = None) -> np.ndarray:
    if probs.shape[1] == 2:
        return weighted_binary_auc(y == 1, probs[:, 1], w)
    per_class = [weighted_binary_auc(y == c, probs[:, c], w) for c in np.unique(y)]
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.vstack(per_class), axis=0) if len(per_class) > 1 else np.full(len(w), np.nan)


@WEIGHTED.register("accuracy")
def _w_accuracy(y: np.ndarray, probs: np.ndarray, w: np.ndarray, pred: np.ndarray | None = None) -> np.ndarray:
    return _div(w @ (_hard(probs, pred) == y), w.sum(axis=1))


def _hard(probs: np.ndarray, pred: np.ndarray | None) -> np.ndarray:
    """The decoded classes when given (the table's y_pred), else the argmax of the probabilities."""
    return probs.argmax(axis=1) if pred is None else np.asarray(pred)


def _recalls(y: np.ndarray, probs: np.ndarray, w: np.ndarray, classes, pred: np.ndarray | None = None) -> np.ndarray:
    pred = _hard(probs, pred)
    return np.vstack([_div(w @ ((y == c) & (pred == c)), w @ (y == c)) for c in classes])


@WEIGHTED.register("balanced_accuracy")
def _w_balanced_accuracy(y: np.ndarray, probs: np.ndarray, w: np.ndarray, pred: np.ndarray | None = None) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.nanmean(_recalls(y, probs, w, np.unique(y), pred), axis=0)


@WEIGHTED.register("sensitivity")
def _w_sensitivity(y: np.ndarray, probs: np.ndarray, w: np.ndarray, pred: np.ndarray | None = None) -> np.ndarray:
    return _recalls(y, probs, w, [1], pred)[0]


@WEIGHTED.register("specificity")
def _w_specificity(y: np.ndarray, probs: np.ndarray, w: np.ndarray, pred: np.ndarray | None = None) -> np.ndarray:
    return _recalls(y, probs, w, [0], pred)[0]


def weighted_confusion(y: np.ndarray, pred: np.ndarray, n_classes: int, w: np.ndarray) -> np.ndarray:
    """(B, K, K) confusion matrices (rows true, columns predicted) under each row of weights."""
    cell = np.asarray(y) * n_classes + np.asarray(pred)
    onehot = np.zeros((len(cell), n_classes * n_classes))
    onehot[np.arange(len(cell)), cell] = 1.0
    return (w @ onehot).reshape(len(w), n_classes, n_classes)


@WEIGHTED.register("f1_macro")
def _w_f1_macro(y: np.ndarray, probs: np.ndarray, w: np.ndarray, pred: np.ndarray | None = None) -> np.ndarray:
    cm = weighted_confusion(y, _hard(probs, pred), probs.shape[1], w)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    den = 2 * tp + (cm.sum(axis=1) - tp) + (cm.sum(axis=2) - tp)
    return np.where(den > 0, _div(2 * tp, den), 0.0).mean(axis=1)


def _w_kappa(weighting: str) -> WeightedFn:
    def fn(y: np.ndarray, probs: np.ndarray, w: np.ndarray, pred: np.ndarray | None = None) -> np.ndarray:
        k = probs.shape[1]
        cm = weighted_confusion(y, _hard(probs, pred), k, w)
        i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
        cost = np.abs(i - j) if weighting == "linear" else (i - j) ** 2
        total = np.maximum(cm.sum(axis=(1, 2)), 1e-300)[:, None, None]
        expected = cm.sum(axis=2)[:, :, None] * cm.sum(axis=1)[:, None, :] / total
        return 1 - _div(np.sum(cost * cm, axis=(1, 2)), np.sum(cost * expected, axis=(1, 2)))

    return fn


WEIGHTED.add("kappa_linear", _w_kappa("linear"))
WEIGHTED.add("kappa_quadratic", _w_kappa("quadratic"))


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


def weighted_metric(name: str) -> WeightedFn:
    """The vectorised weighted form of registered metric `name`, or its brute-force form when it has none."""
    return WEIGHTED.get(name) if name in WEIGHTED else resampled(METRICS.get(name).fn)


# --------------------------------------------------------------------------------------------------------------
# Bootstrap intervals and paired bootstrap comparisons
# --------------------------------------------------------------------------------------------------------------


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
        point: the point metric (e.g. `kneeoa.metrics.METRICS.get("auc").fn`): gives `value`.
        weighted: its weighted form (e.g. `weighted_metric("auc")`): gives the interval.
        confidence: interval coverage.
        pred: (n,) the arm's decoded classes (prediction table `y_pred`); None: argmax of `probs`.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> y = np.array([0, 1, 0, 1]); p = np.array([[.8, .2], [.3, .7], [.6, .4], [.1, .9]])
        >>> w = bootstrap_weights(np.arange(4), 4, 200, rng)
        >>> ci = bootstrap_ci(y, p, w, point=METRICS.get("accuracy").fn, weighted=weighted_metric("accuracy"))
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


# --------------------------------------------------------------------------------------------------------------
# DeLong
# --------------------------------------------------------------------------------------------------------------


def _midranks(x: np.ndarray) -> np.ndarray:
    """Midranks (1-based; tied values share the mean of their ranks), as in Sun & Xu (2014), Algorithm 1."""
    return sps.rankdata(x, method="average", axis=-1)


@dataclass(frozen=True)
class DeLongResult:
    """AUC(s) with their DeLong covariance; `aucs` (k,), `cov` (k, k)."""

    aucs: np.ndarray
    cov: np.ndarray


def delong(y: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None) -> DeLongResult:
    """AUCs of k correlated scores and their covariance (DeLong et al. 1988), by fast midranks (Sun & Xu 2014).

    Args:
        y: (n,) bool or 0/1 labels, both classes present.
        scores: (k, n) or (n,) scores, higher = more likely positive.
        groups: optional (n,) cluster id per image (the patient). When given, the covariance is the clustered
            estimator of Obuchowski (1997): placement values are summed per cluster, so correlated images of one
            patient are not treated as independent. Without it, the classic DeLong estimator.

    Returns:
        DeLongResult with `aucs` (k,) and `cov` (k, k).

    Raises:
        ValueError: if `y` does not contain both classes.
    """
    y = np.asarray(y).astype(bool)
    x = np.atleast_2d(np.asarray(scores, dtype=float))
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        raise ValueError(f"DeLong needs positives and negatives; got {m} positive and {n} negative images.")
    pos, neg = x[:, y], x[:, ~y]
    tx, ty, tz = _midranks(pos), _midranks(neg), _midranks(np.concatenate([pos, neg], axis=1))
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    v10 = (tz[:, :m] - tx) / n  # placement of each positive among the negatives
    v01 = 1 - (tz[:, m:] - ty) / m  # placement of each negative among the positives
    if groups is None:
        cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
        return DeLongResult(aucs, cov)
    codes, n_clusters = patient_codes(np.asarray(groups))
    if n_clusters < 2:
        raise ValueError("Clustered DeLong needs at least two patients.")
    cx, cy = codes[y], codes[~y]
    k = len(x)
    sum10, sum01 = np.zeros((k, n_clusters)), np.zeros((k, n_clusters))
    for r in range(k):
        sum10[r] = np.bincount(cx, weights=v10[r], minlength=n_clusters)
        sum01[r] = np.bincount(cy, weights=v01[r], minlength=n_clusters)
    mi = np.bincount(cx, minlength=n_clusters)
    ni = np.bincount(cy, minlength=n_clusters)
    e10 = sum10 - mi * aucs[:, None]
    e01 = sum01 - ni * aucs[:, None]
    f = n_clusters / (n_clusters - 1)
    s10 = f * (e10 @ e10.T) / m
    s01 = f * (e01 @ e01.T) / n
    s11 = f * (e10 @ e01.T)
    cov = s10 / m + s01 / n + (s11 + s11.T) / (m * n)
    return DeLongResult(aucs, cov)


def delong_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, *, groups: np.ndarray | None = None,
                confidence: float = 0.95) -> Comparison:
    """DeLong's paired test of AUC(a) - AUC(b) on the same images, with a normal-theory CI of the difference.

    Example:
        >>> y = np.array([0, 0, 1, 1, 1]); a = np.array([.1, .2, .6, .7, .8]); b = np.array([.3, .6, .2, .7, .9])
        >>> round(delong_test(y, a, b).difference, 4)
        0.3333
    """
    res = delong(y, np.vstack([score_a, score_b]), groups)
    d = float(res.aucs[0] - res.aucs[1])
    var = float(res.cov[0, 0] + res.cov[1, 1] - 2 * res.cov[0, 1])
    z = sps.norm.ppf(0.5 + confidence / 2)
    if var <= 1e-15:  # identical rankings: no difference and no variance
        return Comparison(d, d, d, 1.0 if abs(d) < 1e-12 else 0.0, "DeLong")
    se = math.sqrt(var)
    return Comparison(d, d - z * se, d + z * se, float(2 * sps.norm.sf(abs(d) / se)), "DeLong")


# --------------------------------------------------------------------------------------------------------------
# Multiplicity and formatting
# --------------------------------------------------------------------------------------------------------------


def holm(p_values) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values; NaNs stay NaN and do not count towards the family size.

    Example:
        >>> holm([0.01, 0.04, 0.03]).round(2).tolist()
        [0.03, 0.06, 0.06]
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="mergesort")]
    m = len(order)
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order]) if m else np.array([])
    out[order] = np.minimum(adjusted, 1.0)
    return out


def format_ci(value: float, low: float, high: float, digits: int = 3) -> str:
    """"value [low, high]" for tables; just the value when the interval is missing, "n/a" when the value is.

    Example:
        >>> format_ci(0.81234, 0.75, 0.866)
        '0.812 [0.750, 0.866]'
    """
    def fmt(v: float) -> str:
        return f"{v:.{digits}f}"

    if value is None or not np.isfinite(value):
        return "n/a"
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return fmt(value)
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


# --------------------------------------------------------------------------------------------------------------
# ROC curves with bootstrap bands
# --------------------------------------------------------------------------------------------------------------


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
        tpr = np.c_[np.zeros(len(w)), _div(tp, tp[:, -1:])]
        fpr = np.c_[np.zeros(len(w)), _div(fp, fp[:, -1:])]
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
