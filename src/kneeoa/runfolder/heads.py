"""Fitted embedding heads (owner: `boost`): RUN_DIR/heads/<arm>/<task>.json, one file per arm x task.

- `<prefix>_xgb` arms: an XGBoost model file (`kneeoa.models.estimators.XGBHead.save`), kept for `kneeoa export`.
- `<prefix>_linear` arms: the linear probe as plain numbers (`write_linear_probe`): the scaler's mean and scale and the
  logistic regression's coef, intercept and classes, enough to rebuild its probabilities exactly. Grad-CAM through the
  encoder (`kneeoa.arms.encoder_cam`) reads it back as a `LinearProbe`; export never packages it.

`keep_fits` keeps what `kneeoa.models.probes.fit_arm` fitted: each head (here, or under fusion/ for the
feature-fusion arms) and the arm's prediction tables.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kneeoa.errors import WeightsNotFoundError
from kneeoa.io import write_json
from kneeoa.runfolder.predictions import make_prediction_table, write_predictions
from kneeoa.tasks import get_task

if TYPE_CHECKING:
    from kneeoa.models.probes import TaskFit

_log = logging.getLogger(__name__)

HEADS_DIR = "heads"
#: The "kind" a linear-probe file carries, so an XGBoost reader and this one never take each other's files.
LINEAR_KIND = "linear_probe"


def head_path(run_dir: Path, arm: str, task: str) -> Path:
    return Path(run_dir) / HEADS_DIR / arm / f"{task}.json"


@dataclass(frozen=True)
class LinearProbe:
    """Standardised features + logistic regression, as numbers: scores ((x - mean) / scale) @ coef.T + intercept.

    Attributes:
        mean, scale: (D,) the scaler's `mean_` and `scale_`.
        coef: (1, D) for two classes in training, else (C, D); intercept: (1,) or (C,).
        classes: (C,) the task classes seen in training, in scikit-learn's `classes_` order.
        n_classes: K, the task's class count (columns of `logits` and `predict_proba`).
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    classes: np.ndarray
    n_classes: int

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight (K, D), bias (K,)) with logits = X @ weight.T + bias, the standardisation folded in.

        Softmax of the logits is the probe's probabilities. A two-class probe's one score s becomes (-s/2, s/2):
        softmax gives (1 - sigmoid(s), sigmoid(s)), as scikit-learn does, and each class's logit has a gradient
        (Grad-CAM can explain either). Classes absent from training get a zero row and bias -inf (probability 0,
        as the boost stage wrote them).
        """
        w = self.coef / self.scale
        b = self.intercept - w @ self.mean
        if len(w) == 1:
            w, b = np.concatenate([-w / 2, w / 2]), np.concatenate([-b / 2, b / 2])
        weight, bias = np.zeros((self.n_classes, w.shape[1])), np.full(self.n_classes, -np.inf)
        weight[self.classes], bias[self.classes] = w, b
        return weight, bias

    def logits(self, X: np.ndarray) -> np.ndarray:
        """(n, K) float64 logits of features X (n, D)."""
        weight, bias = self.affine()
        return np.asarray(X, dtype=np.float64) @ weight.T + bias

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, K) class probabilities, classes absent from training at 0."""
        z = self.logits(X)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def write_linear_probe(pipeline: Any, path: Path, n_classes: int) -> Path:
    """Write a fitted StandardScaler + LogisticRegression pipeline (`kneeoa.models.probes.fit_linear`) as JSON.

    Floats are written in full (Python's shortest round-trip form), so `read_linear_probe` rebuilds the
    pipeline's `predict_proba` on float64 features to rounding. (On float32 embeddings scikit-learn standardises in
    float32, so the boost stage's tables differ from the float64 numbers by float32 rounding, about 1e-7.)
    """
    scaler, logreg = pipeline[0], pipeline[-1]
    return write_json({"kind": LINEAR_KIND, "n_classes": int(n_classes), "classes": logreg.classes_.tolist(),
                       "mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist(),
                       "coef": logreg.coef_.tolist(), "intercept": logreg.intercept_.tolist()}, path)


def read_linear_probe(path: Path) -> LinearProbe:
    """The linear probe `write_linear_probe` wrote.

    Raises:
        WeightsNotFoundError: the file is missing, or holds another kind of head (names the command that writes it).
    """
    path = Path(path)
    remake = f"Re-run `kneeoa boost {path.parents[2]}` (it keeps every fitted linear probe)."
    if not path.exists():
        raise WeightsNotFoundError(f"{path} is missing: the linear probe of this arm and task was not kept. {remake}")
    state = json.loads(path.read_text())
    if state.get("kind") != LINEAR_KIND:
        raise WeightsNotFoundError(f"{path} is not a linear probe (kind {state.get('kind')!r}). {remake}")
    return LinearProbe(mean=np.asarray(state["mean"]), scale=np.asarray(state["scale"]),
                       coef=np.asarray(state["coef"]), intercept=np.asarray(state["intercept"]),
                       classes=np.asarray(state["classes"], dtype=int), n_classes=int(state["n_classes"]))


def _save_xgb(model: Any, path: Path, n_classes: int) -> Path:
    return model.save(path)


def _load_xgb(path: Path) -> Any:
    from kneeoa.models.estimators import XGBHead

    if not Path(path).exists():
        raise WeightsNotFoundError(f"{path} is missing: the fitted XGBoost head of this arm and task was not kept. "
                                   f"Re-run the stage that fits it (`kneeoa boost` or `kneeoa fusion`).")
    return XGBHead.load(path)


#: How each head of `kneeoa.models.probes.HEADS` is kept and read back: (save(model, path, K), load(path)).
HEAD_FILES: dict[str, tuple[Any, Any]] = {"xgb": (_save_xgb, _load_xgb), "linear": (write_linear_probe,
                                                                                     read_linear_probe)}


def save_head(head: str, model: Any, path: Path, n_classes: int) -> Path:
    """Keep a fitted head (the boost arms' under heads/, the feature-fusion arms' under fusion/)."""
    return HEAD_FILES[head][0](model, path, n_classes)


def load_head(head: str, path: Path) -> Any:
    """A kept head, with `predict_proba(X) -> (n, K)`.

    Raises:
        WeightsNotFoundError: the file is missing or holds another kind of head.
    """
    return HEAD_FILES[head][1](path)


def keep_fits(head: str, fits: dict[str, TaskFit], *, run_dir: Path, arm: str,
              keep: Callable[[str], Path]) -> dict[str, dict[str, Any]]:
    """Keep each fitted head of an arm at `keep(task)` (`save_head`) and write its prediction tables; returns the
    settings chosen (or why a task was skipped) per task, for the arm record."""
    for task, fit in fits.items():
        if fit.fitted:
            save_head(head, fit.model, keep(task), get_task(task).n_classes)
            write_predictions(make_prediction_table(fit.image_id, fit.split, fit.y_true, fit.probs), run_dir, arm,
                              task)
        _log.info("%s %s: %s", arm, task, fit.chosen)
    return {task: fit.chosen for task, fit in fits.items()}
