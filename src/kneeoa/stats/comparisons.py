"""Paired tests between arms: DeLong's test of two correlated AUCs and Holm's multiplicity correction.

Binary AUCs are compared with DeLong's test (DeLong et al. 1988), computed with the midrank algorithm of Sun & Xu
(2014) and, when patient ids are given, with the clustered variance of Obuchowski (1997) so that two knees or several
visits of one patient are not counted as independent. Holm (1979) adjusts the p-values of one family of comparisons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from kneeoa.stats.bootstrap import Comparison, patient_codes


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
