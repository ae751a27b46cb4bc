"""Late fusion: a logistic stacker over member arms' class probabilities, cross-fitted by patient on val.

The stacker reads each member's log-probabilities (clipped at 1e-6) side by side and fits an L2-regularised
multinomial logistic regression (`C = fusion.stack_c`). Its only training data are val rows, so its val figures
would flatter it if it were scored on the rows it was fitted on. `cross_fit` therefore splits the val *patients*
into folds (stratified on the label, a patient's knees always in one fold), fits on all folds but one and predicts
the one left out: every val prediction comes from a stacker that never saw that knee nor its patient's other knee.
The stacker applied to test is then fitted once on every val row and applied unchanged; test rows are never an
input of any fit.

For ordinal tasks decoded with cut-points (`cnn.klg_decode: cutpoints`, the same decoding the CNN arms use), the
cut-points are tuned on the fitting folds' probabilities and applied to the held-out fold, so the decoding is
cross-fitted too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold

from kneeoa.errors import DataError
from kneeoa.models.cnn.heads import decode, tune_cutpoints

EPS = 1e-6


def stack_inputs(member_probs: list[np.ndarray]) -> np.ndarray:
    """(n, sum K_m) log-probabilities of every member side by side (the stacker's features)."""
    return np.hstack([np.log(np.clip(np.asarray(p, dtype="float64"), EPS, 1.0)) for p in member_probs])


@dataclass
class Stacker:
    """A fitted stacker: multinomial logistic regression on `stack_inputs`, plus its decoding.

    Attributes:
        coef: (K, F) weights, intercept: (K,), classes: the class index of each row of `coef` (classes absent
        from the fitting rows get probability 0), n_classes: K of the task, decoding: {"method": "argmax"} or
        {"method": "cutpoints", "cuts": [...]} (`kneeoa.models.cnn.heads.decode`).
    """

    coef: np.ndarray
    intercept: np.ndarray
    classes: np.ndarray
    n_classes: int
    decoding: dict[str, Any]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        z = np.asarray(X, dtype="float64") @ self.coef.T + self.intercept
        if len(self.classes) == 2 and self.coef.shape[0] == 1:  # sklearn's binary form: one logit for class 1
            z = np.hstack([np.zeros_like(z), z])
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        out = np.zeros((len(p), self.n_classes))
        out[:, self.classes] = p
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        return decode(self.predict_proba(X), self.decoding)

    def to_dict(self) -> dict[str, Any]:
        return {"coef": self.coef.tolist(), "intercept": self.intercept.tolist(), "classes": self.classes.tolist(),
                "n_classes": self.n_classes, "decoding": self.decoding}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stacker:
        return cls(np.asarray(d["coef"], dtype="float64"), np.asarray(d["intercept"], dtype="float64"),
                   np.asarray(d["classes"], dtype="int64"), int(d["n_classes"]), dict(d["decoding"]))


@dataclass(frozen=True)
class Decoding:
    """How a fitted stacker turns probabilities into classes: the task's kind and the CNN arms' decoding settings."""

    cutpoints: bool = False  # ordinal task with `cnn.klg_decode: cutpoints`
    n_boot: int = 0
    accuracy_weight: float = 0.0
    seed: int = 0


def fit_stacker(X: np.ndarray, y: np.ndarray, groups: np.ndarray, n_classes: int, *, c: float,
                decoding: Decoding) -> Stacker:
    """Fit the stacker (and, for cut-point decoding, its cut-points) on rows `X`, `y` of patients `groups`."""
    y = np.asarray(y, dtype="int64")
    classes = np.unique(y)
    if len(classes) < 2:  # a tiny fold: nothing to weigh, every row gets the one class seen
        return Stacker(np.zeros((1, X.shape[1])), np.zeros(1), classes, n_classes, {"method": "argmax"})
    model = LogisticRegression(C=c, max_iter=5000)
    model.fit(X, y)
    stacker = Stacker(model.coef_.astype("float64"), model.intercept_.astype("float64"),
                      model.classes_.astype("int64"), n_classes, {"method": "argmax"})
    if decoding.cutpoints:
        cuts = tune_cutpoints(y, stacker.predict_proba(X), groups=groups, n_boot=decoding.n_boot,
                              seed=decoding.seed, accuracy_weight=decoding.accuracy_weight)
        stacker.decoding = {"method": "cutpoints", "cuts": cuts}
    return stacker


def patient_folds(y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index (0..n_folds-1) per row: patients never split across folds, folds stratified on the label.

    Raises:
        DataError: fewer patients than folds.
    """
    n_patients = len(np.unique(groups))
    if n_patients < n_folds:
        raise DataError(f"Cross-fitting the stacker in {n_folds} folds needs at least {n_folds} val patients; val "
                        f"has {n_patients}. Lower fusion.folds or use a larger val split.")
    folds = np.full(len(y), -1, dtype="int64")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
        folds[held] = k
    return folds


def cross_fit(X: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: np.ndarray, n_classes: int, *, c: float,
              decoding: Decoding) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold probabilities (n, K) and classes (n,): each fold predicted by a stacker fitted on the others."""
    probs = np.zeros((len(y), n_classes))
    pred = np.zeros(len(y), dtype="int64")
    for k in np.unique(folds):
        held = folds == k
        stacker = fit_stacker(X[~held], y[~held], groups[~held], n_classes, c=c, decoding=decoding)
        probs[held] = stacker.predict_proba(X[held])
        pred[held] = stacker.predict(X[held])
    return probs, pred
