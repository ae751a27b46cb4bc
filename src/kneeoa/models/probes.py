"""Classifiers on fixed feature vectors, fitted on train and chosen on val only: the heads of the embedding arms
(`kneeoa boost`) and of the feature-fusion arms (`kneeoa fusion`).

`HEADS` maps a head name to `fit(Xtr, ytr, Xva, yva, k, cfg) -> (model, chosen settings)`:
- `xgb`: XGBoost (`kneeoa.models.estimators.XGBHead`), class-weighted, `multi:softprob` for more than two classes; every
  combination of `foundation.xgb_grid` is fit on train and early-stopped on val, and the lowest class-weighted val
  log-loss wins;
- `linear`: standardised features + class-weighted logistic regression, C from `foundation.linear_c_grid` by the same
  val log-loss.
Test rows are only predicted, never used for a choice. `fit_arm` returns what it fitted and the probabilities of
every labelled row (`TaskFit` per task); the run folder keeps the heads and writes the prediction tables
(`kneeoa.runfolder.heads.keep_fits`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kneeoa.config import Config, FoundationCfg
from kneeoa.errors import ConfigError
from kneeoa.models.estimators import XGBHead, balanced_weights
from kneeoa.registry import Registry
from kneeoa.tasks import get_task

#: Grid keys XGBHead takes; the rest of its parameters come from fixed config keys.
_XGB_SEARCHABLE = ("max_depth", "learning_rate", "min_child_weight", "max_bin")

Fit = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, Config], tuple[Any, dict[str, Any]]]
HEADS: Registry[Fit] = Registry("embedding head")


def _val_loss(y: np.ndarray, probs: np.ndarray, k: int) -> float:
    return float(log_loss(y, probs, labels=np.arange(k), sample_weight=balanced_weights(y, k)))


def xgb_grid(cfg: FoundationCfg) -> list[dict[str, Any]]:
    """Every combination of `cfg.xgb_grid`, in order.

    Example:
        >>> xgb_grid(FoundationCfg(xgb_grid={"max_depth": [3, 5], "learning_rate": [0.1]}))
        [{'max_depth': 3, 'learning_rate': 0.1}, {'max_depth': 5, 'learning_rate': 0.1}]
    """
    bad = [k for k in cfg.xgb_grid if k not in _XGB_SEARCHABLE]
    if bad:
        raise ConfigError(f"Unknown key '{bad[0]}' in foundation.xgb_grid. Valid keys: {', '.join(_XGB_SEARCHABLE)}.")
    keys = list(cfg.xgb_grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(cfg.xgb_grid[k] for k in keys))]


def fit_xgb(Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray, yva: np.ndarray, k: int,
            cfg: Config) -> tuple[XGBHead, dict[str, Any]]:
    """The grid combination with the lowest val log-loss, each early-stopped on val."""
    fc = cfg.foundation
    best: tuple[float, XGBHead, dict[str, Any]] | None = None
    for combo in xgb_grid(fc):
        params = {"max_bin": fc.xgb_max_bin, **combo}
        model = XGBHead(n_classes=k, n_estimators=fc.xgb_n_estimators, early_stopping_rounds=fc.xgb_early_stopping,
                        n_jobs=fc.n_jobs, random_state=cfg.seed, **params)
        model.fit(Xtr, ytr, eval_set=(Xva, yva))
        loss = _val_loss(yva, model.predict_proba(Xva), k)
        if best is None or loss < best[0]:
            best = (loss, model, {**params, "n_trees": model.best_iteration_ + 1, "val_logloss": round(loss, 5)})
    return best[1], best[2]


def fit_linear(Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray, yva: np.ndarray, k: int,
               cfg: Config) -> tuple[Any, dict[str, Any]]:
    """Standardised logistic regression, C from `linear_c_grid` by val log-loss."""
    best = None
    for c in cfg.foundation.linear_c_grid:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000))
        model.fit(Xtr, ytr)
        loss = _val_loss(yva, _full_proba(model, Xva, k), k)
        if best is None or loss < best[0]:
            best = (loss, model, {"C": c, "val_logloss": round(loss, 5)})
    return best[1], best[2]


HEADS.add("xgb", fit_xgb)
HEADS.add("linear", fit_linear)


def _full_proba(model: Any, X: np.ndarray, k: int) -> np.ndarray:
    """(n, k) probabilities; classes absent from training get probability 0."""
    p = model.predict_proba(X)
    if p.shape[1] == k:
        return p
    out = np.zeros((len(X), k))
    out[:, np.asarray(model.classes_, dtype=int)] = p
    return out


@dataclass(frozen=True)
class TaskFit:
    """One task's head, fitted on train and chosen on val, with its probabilities for every labelled row.

    Attributes:
        chosen: the settings chosen on val, or {"skipped": why} when the task could not be fitted.
        model: the fitted head (`predict_proba(X) -> (n, K)`); None when skipped.
        image_id, split, y_true: the labelled manifest rows, in manifest order; probs: (n, K) their class
            probabilities (all None when skipped).
    """

    chosen: dict[str, Any]
    model: Any = None
    image_id: pd.Series | None = None
    split: pd.Series | None = None
    y_true: np.ndarray | None = None
    probs: np.ndarray | None = None

    @property
    def fitted(self) -> bool:
        return self.model is not None


def fit_task(head: str, X: np.ndarray, manifest: pd.DataFrame, task: str, cfg: Config) -> TaskFit:
    """Fit head `head` for `task` on the train rows of `X` (one row per manifest row), chosen on the val rows.

    Returns the fitted head and its probabilities for every labelled row, or (not fitted) why the task was skipped:
    train lacks two classes or val has no labelled image.
    """
    labelled = manifest[task].notna().to_numpy()
    sub, Xs = manifest[labelled], X[labelled]
    y = sub[task].to_numpy(dtype=int)
    tr, va = (sub["split"] == "train").to_numpy(), (sub["split"] == "val").to_numpy()
    if len(np.unique(y[tr])) < 2 or not va.any():
        return TaskFit({"skipped": f"needs two classes in train and labelled val images; train has classes "
                                   f"{sorted(np.unique(y[tr]).tolist())}, val has {int(va.sum())} image(s)"})
    k = get_task(task).n_classes
    model, chosen = HEADS.get(head)(Xs[tr], y[tr], Xs[va], y[va], k, cfg)
    return TaskFit(chosen, model, sub["image_id"], sub["split"], y, _full_proba(model, Xs, k))


def fit_arm(head: str, X: np.ndarray, manifest: pd.DataFrame, tasks: list[str], cfg: Config) -> dict[str, TaskFit]:
    """`fit_task` for every task, in order: the heads of one arm (a boost arm, a feature-fusion arm)."""
    return {task: fit_task(head, X, manifest, task, cfg) for task in tasks}
