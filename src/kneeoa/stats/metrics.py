"""Point metrics per task family, registered with their properties.

Every metric takes the prediction-table view of one arm x task x split: `y_true` (n,) int class indices, `probs`
(n, K) float class probabilities and optionally `pred` (n,) the arm's decoded classes (the table's `y_pred`), and
returns one float (NaN where undefined, e.g. AUC with one class present). Hard predictions are `pred`, or the argmax
of `probs` when it is not given. Scores are higher-is-better (scikit-learn's `_score` meaning).

Each entry also carries its weighted form (`kneeoa.stats.weighted`), which the bootstrap evaluates under all resamples
at once; `Metric.weighted_fn` falls back to the brute-force form for a metric registered without one. This is the one
metric registry: evaluation, statistics, model selection and the report all read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn import metrics as skm

from kneeoa.registry import Registry
from kneeoa.stats import weighted as w
from kneeoa.tasks import Task


@dataclass(frozen=True)
class Metric:
    """A registered metric: `fn(y_true, probs, pred=None) -> float`, the task kinds it applies to, and its weighted
    form `weighted(y_true, probs, weights (B, n), pred=None) -> (B,)` for the bootstrap (None: brute force)."""

    name: str
    fn: Callable[..., float]
    kinds: tuple[str, ...] = ("binary", "ordinal")
    higher_is_better: bool = True
    needs_probs: bool = False
    weighted: w.WeightedFn | None = None

    @property
    def weighted_fn(self) -> w.WeightedFn:
        """The vectorised weighted form, or else the brute-force one (`kneeoa.stats.weighted.resampled`)."""
        return self.weighted if self.weighted is not None else w.resampled(self.fn)


METRICS: Registry[Metric] = Registry("metric")


def _pred(probs: np.ndarray, pred: np.ndarray | None = None) -> np.ndarray:
    return np.asarray(probs).argmax(axis=1) if pred is None else np.asarray(pred)


def _labels(probs: np.ndarray) -> np.ndarray:
    return np.arange(np.asarray(probs).shape[1])


def accuracy(y_true: np.ndarray, probs: np.ndarray, pred: np.ndarray | None = None) -> float:
    return float(np.mean(np.asarray(y_true) == _pred(probs, pred)))


def balanced_accuracy(y_true: np.ndarray, probs: np.ndarray, pred: np.ndarray | None = None) -> float:
    """Mean recall over the classes present in y_true."""
    y, p = np.asarray(y_true), _pred(probs, pred)
    return float(np.mean([np.mean(p[y == c] == c) for c in np.unique(y)]))


def f1_macro(y_true: np.ndarray, probs: np.ndarray, pred: np.ndarray | None = None) -> float:
    """Unweighted mean F1 over all K classes (a class never predicted nor present scores 0)."""
    return float(skm.f1_score(y_true, _pred(probs, pred), labels=_labels(probs), average="macro", zero_division=0))


def sensitivity(y_true: np.ndarray, probs: np.ndarray, pred: np.ndarray | None = None) -> float:
    """TP / (TP + FN) for class 1; NaN without positives."""
    y, p = np.asarray(y_true), _pred(probs, pred)
    return float(np.mean(p[y == 1] == 1)) if (y == 1).any() else float("nan")


def specificity(y_true: np.ndarray, probs: np.ndarray, pred: np.ndarray | None = None) -> float:
    """TN / (TN + FP); NaN without negatives."""
    y, p = np.asarray(y_true), _pred(probs, pred)
    return float(np.mean(p[y == 0] == 0)) if (y == 0).any() else float("nan")


def auc(y_true: np.ndarray, probs: np.ndarray, pred: np.ndarray | None = None) -> float:
    """ROC AUC: binary on prob_1; multiclass one-vs-rest macro over the classes present. NaN with one class."""
    y, probs = np.asarray(y_true), np.asarray(probs, dtype="float64")
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(skm.roc_auc_score(y, probs[:, 1]))
    return float(np.mean([skm.roc_auc_score(y == c, probs[:, c]) for c in present]))


def kappa_linear(y_true: np.ndarray, probs: np.ndarray, pred: np.ndarray | None = None) -> float:
    return float(skm.cohen_kappa_score(y_true, _pred(probs, pred), labels=_labels(probs), weights="linear"))


def kappa_quadratic(y_true: np.ndarray, probs: np.ndarray, pred: np.ndarray | None = None) -> float:
    """Quadratic-weighted Cohen's kappa, the paper's KLG metric."""
    return float(skm.cohen_kappa_score(y_true, _pred(probs, pred), labels=_labels(probs), weights="quadratic"))


METRICS.add("accuracy", Metric("accuracy", accuracy, weighted=w.weighted_accuracy))
METRICS.add("balanced_accuracy", Metric("balanced_accuracy", balanced_accuracy, weighted=w.weighted_balanced_accuracy))
METRICS.add("f1_macro", Metric("f1_macro", f1_macro, weighted=w.weighted_f1_macro))
METRICS.add("sensitivity", Metric("sensitivity", sensitivity, kinds=("binary",), weighted=w.weighted_sensitivity))
METRICS.add("specificity", Metric("specificity", specificity, kinds=("binary",), weighted=w.weighted_specificity))
METRICS.add("auc", Metric("auc", auc, needs_probs=True, weighted=w.weighted_auc))
METRICS.add("kappa_linear", Metric("kappa_linear", kappa_linear, kinds=("ordinal",),
                                   weighted=w.weighted_kappa("linear")))
METRICS.add("kappa_quadratic", Metric("kappa_quadratic", kappa_quadratic, kinds=("ordinal",),
                                      weighted=w.weighted_kappa("quadratic")))


def metrics_for(task: Task) -> list[Metric]:
    """The registered metrics that apply to `task`'s kind, in registry order."""
    return [m for _, m in METRICS.items() if task.kind in m.kinds]


def confusion(y_true: np.ndarray, probs: np.ndarray, pred: np.ndarray | None = None) -> np.ndarray:
    """(K, K) int confusion matrix, rows = true class, columns = predicted class."""
    return skm.confusion_matrix(y_true, _pred(probs, pred), labels=_labels(probs))
