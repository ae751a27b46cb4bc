"""Classification heads on frozen embeddings, with the scikit-learn estimator contract.

`XGBHead` wraps XGBoost's native API so that a task always gets all K probability columns (a KL grade absent from a
small training split still gets its column), early-stops on a validation set passed to `fit`, and weights classes
by inverse frequency. `clone`, `get_params` and pickling work as for any scikit-learn classifier. A fitted head is
kept as one XGBoost JSON model file (`XGBHead.save` / `XGBHead.load`), at `kneeoa.runfolder.heads.head_path` in a
run folder.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from kneeoa.errors import ConfigError
from kneeoa.io import atomic_path

#: Booster attribute holding what XGBoost's own file lacks to rebuild the head: parameters, classes_, trees kept.
_STATE_ATTR = "kneeoa_xgb_head"


def _xgboost():
    try:
        return importlib.import_module("xgboost")
    except ImportError as e:
        raise ImportError("The XGBoost head needs the 'xgboost' package: pip install xgboost-cpu") from e


def balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-sample weights n / (K_present * count[y]): each present class carries the same total weight.

    Example:
        >>> balanced_weights(np.array([0, 0, 0, 1]), 2).round(3).tolist()
        [0.667, 0.667, 0.667, 2.0]
    """
    y = np.asarray(y, dtype=int)
    counts = np.bincount(y, minlength=n_classes).astype(float)
    present = int((counts > 0).sum())
    return len(y) / (present * counts[y])


class XGBHead(ClassifierMixin, BaseEstimator):
    """Gradient-boosted trees on embeddings: `binary:logistic` for two classes, `multi:softprob` otherwise.

    Parameters:
        n_classes: number of classes K (labels are 0..K-1); None takes max(y) + 1 at fit.
        n_estimators: upper bound on trees; with `eval_set` early stopping picks the number.
        max_depth, learning_rate, min_child_weight, max_bin: XGBoost's parameters of the same names.
        early_stopping_rounds: rounds without val improvement before stopping (used only with `eval_set`).
        class_weight: "balanced" (inverse class frequency) or None.
        n_jobs: threads. random_state: seed.

    Attributes:
        classes_: (K,) int, 0..K-1. booster_: the fitted xgboost Booster. best_iteration_: trees kept - 1.
        best_score_: val log-loss at `best_iteration_` (NaN without `eval_set`).
    """

    def __init__(self, *, n_classes: int | None = None, n_estimators: int = 500, max_depth: int = 4,
                 learning_rate: float = 0.1, min_child_weight: float = 1.0, max_bin: int = 64,
                 early_stopping_rounds: int = 30, class_weight: str | None = "balanced", n_jobs: int = 2,
                 random_state: int = 0) -> None:
        self.n_classes = n_classes
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.min_child_weight = min_child_weight
        self.max_bin = max_bin
        self.early_stopping_rounds = early_stopping_rounds
        self.class_weight = class_weight
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _weights(self, y: np.ndarray) -> np.ndarray | None:
        if self.class_weight not in ("balanced", None):
            raise ConfigError(f"The 'class_weight' parameter of XGBHead must be 'balanced' or None. "
                              f"Got {self.class_weight!r}.")
        return balanced_weights(y, len(self.classes_)) if self.class_weight == "balanced" else None

    def save(self, path: Path) -> Path:
        """Write the fitted head to `path` as one XGBoost JSON model, atomically.

        The booster's trees are stored exactly; `classes_`, `best_iteration_`, `best_score_` and the parameters ride
        along as a booster attribute, so `XGBHead.load(path).predict_proba` equals this head's.
        """
        booster = self.booster_.copy()
        booster.set_attr(**{_STATE_ATTR: json.dumps({
            "params": self.get_params(), "classes": self.classes_.tolist(), "best_iteration": self.best_iteration_,
            "best_score": self.best_score_})})
        with atomic_path(path) as tmp:
            tmp.write_bytes(booster.save_raw(raw_format="json"))  # by bytes: save_model picks the format by suffix
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> XGBHead:
        """A fitted head from a file `save` wrote.

        Raises:
            ValueError: `path` is an XGBoost model without the head's state (not written by `XGBHead.save`).
        """
        booster = _xgboost().Booster(model_file=str(path))
        state = booster.attr(_STATE_ATTR)
        if state is None:
            raise ValueError(f"{path} is an XGBoost model without the '{_STATE_ATTR}' attribute XGBHead.save writes; "
                             "write it with XGBHead.save (`kneeoa boost RUN_DIR` does).")
        state = json.loads(state)
        head = cls(**state["params"])
        head.classes_, head.booster_ = np.asarray(state["classes"]), booster
        head.best_iteration_, head.best_score_ = int(state["best_iteration"]), float(state["best_score"])
        return head

    def fit(self, X: np.ndarray, y: np.ndarray, *, eval_set: tuple[np.ndarray, np.ndarray] | None = None) -> XGBHead:
        """Fit on (X (n, D) float, y (n,) int in 0..K-1); early-stop on `eval_set` = (X_val, y_val) when given."""
        xgb = _xgboost()
        X, y = np.asarray(X, dtype=np.float32), np.asarray(y, dtype=int)
        k = self.n_classes or int(y.max()) + 1
        if y.min() < 0 or y.max() >= k:
            raise ValueError(f"XGBHead labels must be 0..{k - 1}; got {y.min()}..{y.max()}.")
        self.classes_ = np.arange(k)
        params: dict[str, Any] = {
            "max_depth": self.max_depth, "eta": self.learning_rate, "min_child_weight": self.min_child_weight,
            "max_bin": self.max_bin, "tree_method": "hist", "nthread": self.n_jobs, "seed": self.random_state,
            "verbosity": 0}
        params.update({"objective": "binary:logistic", "eval_metric": "logloss"} if k == 2 else
                      {"objective": "multi:softprob", "num_class": k, "eval_metric": "mlogloss"})
        dtrain = xgb.DMatrix(X, label=y, weight=self._weights(y))
        evals, stop = [], None
        if eval_set is not None:
            Xv, yv = np.asarray(eval_set[0], dtype=np.float32), np.asarray(eval_set[1], dtype=int)
            evals, stop = [(xgb.DMatrix(Xv, label=yv, weight=self._weights(yv)), "val")], self.early_stopping_rounds
        record: dict[str, Any] = {}
        self.booster_ = xgb.train(params, dtrain, num_boost_round=self.n_estimators, evals=evals,
                                  early_stopping_rounds=stop, evals_result=record, verbose_eval=False)
        if evals:
            self.best_iteration_ = int(self.booster_.best_iteration)
            self.best_score_ = float(next(iter(record["val"].values()))[self.best_iteration_])
        else:
            self.best_iteration_, self.best_score_ = self.n_estimators - 1, float("nan")
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, K) float64 class probabilities in `classes_` order, from the trees up to `best_iteration_`."""
        xgb = _xgboost()
        p = self.booster_.predict(xgb.DMatrix(np.asarray(X, dtype=np.float32)),
                                  iteration_range=(0, self.best_iteration_ + 1)).astype(np.float64)
        if p.ndim == 1:
            p = np.stack([1 - p, p], axis=1)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]
