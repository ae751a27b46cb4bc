"""Stage `boost`: classifiers on frozen embeddings, one per encoder x task (the paper's foundation-model arms).

Two heads per encoder:
- `<prefix>_xgb`: XGBoost (`kneeoa.estimators.XGBHead`), class-weighted, `multi:softprob` for KLG. For every
  combination of `foundation.xgb_grid` a model is fit on train and early-stopped on val (at most
  `xgb_n_estimators` trees, patience `xgb_early_stopping`); the combination with the lowest class-weighted val
  log-loss is kept. The paper does not report its search, so this small grid is our choice.
- `<prefix>_linear`: a linear probe, standardised features + class-weighted logistic regression, C chosen from
  `foundation.linear_c_grid` by the same val log-loss.
Test images are only predicted, never used for a choice. Predictions are written for every split; the arm record
holds the weights' model id, revision and checksum and the chosen hyperparameters per task. Each fitted XGBoost head
is kept at RUN_DIR/heads/<prefix>_xgb/<task>.json (`kneeoa.runfolder.heads`), for `kneeoa export`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kneeoa.config import Config, FoundationCfg
from kneeoa.errors import ConfigError, ManifestError
from kneeoa.estimators import XGBHead, balanced_weights
from kneeoa.models.foundation import encoder_arms, get_encoder_spec
from kneeoa.registry import Registry
from kneeoa.runfolder.arms import read_arms, record_arm
from kneeoa.runfolder.embeddings import embedding_matrix, embeddings_path, read_embeddings
from kneeoa.runfolder.heads import head_path
from kneeoa.runfolder.manifest import read_manifest
from kneeoa.runfolder.predictions import make_prediction_table, write_predictions
from kneeoa.tasks import available_tasks, get_task

_log = logging.getLogger(__name__)

#: Grid keys XGBHead takes; the rest of its parameters come from fixed config keys.
_XGB_SEARCHABLE = ("max_depth", "learning_rate", "min_child_weight", "max_bin")
#: Tasks that are not learned from labels (zero-shot anatomy QC has y_true = 1 everywhere).
_NOT_LEARNED = ("knee_id",)

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


@HEADS.register("xgb")
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


@HEADS.register("linear")
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


def _full_proba(model: Any, X: np.ndarray, k: int) -> np.ndarray:
    """(n, k) probabilities; classes absent from training get probability 0."""
    p = model.predict_proba(X)
    if p.shape[1] == k:
        return p
    out = np.zeros((len(X), k))
    out[:, np.asarray(model.classes_, dtype=int)] = p
    return out


def _aligned(manifest: pd.DataFrame, table: pd.DataFrame, encoder: str, run_dir: Path) -> np.ndarray:
    missing = ~manifest["image_id"].isin(table["image_id"])
    if missing.any():
        raise ManifestError(f"{embeddings_path(run_dir, encoder)} lacks {int(missing.sum())} manifest image(s), "
                            f"e.g. {manifest['image_id'][missing].iloc[0]!r}. Re-run `kneeoa embed {run_dir} "
                            f"--encoder {encoder}`.")
    return embedding_matrix(table.set_index("image_id").loc[manifest["image_id"]].reset_index())


def _fit_task(head: str, X: np.ndarray, manifest: pd.DataFrame, task: str,
              cfg: Config) -> tuple[Any, pd.DataFrame | None, dict[str, Any]]:
    """(fitted model, prediction table, chosen settings), or (None, None, why it was skipped)."""
    labelled = manifest[task].notna().to_numpy()
    sub, Xs = manifest[labelled], X[labelled]
    y = sub[task].to_numpy(dtype=int)
    tr, va = (sub["split"] == "train").to_numpy(), (sub["split"] == "val").to_numpy()
    if len(np.unique(y[tr])) < 2 or not va.any():
        return None, None, {"skipped": f"needs two classes in train and labelled val images; train has classes "
                                       f"{sorted(np.unique(y[tr]).tolist())}, val has {int(va.sum())} image(s)"}
    k = get_task(task).n_classes
    model, chosen = HEADS.get(head)(Xs[tr], y[tr], Xs[va], y[va], k, cfg)
    probs = _full_proba(model, Xs, k)
    return model, make_prediction_table(sub["image_id"], sub["split"], y, probs), chosen


def run(run_dir: Path, cfg: Config) -> None:
    """Fit the heads of every encoder in `cfg.foundation.encoders` on its embeddings, for every available task.

    An encoder without embeddings keeps the not-run record `embed` gave its arms (or gets one naming the command).
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    tasks = [t for t in available_tasks(manifest, cfg.tasks.names) if t not in _NOT_LEARNED]
    for name in cfg.foundation.encoders:
        spec = get_encoder_spec(name)
        arms = encoder_arms(cfg.foundation, spec.name)
        try:
            table, info = read_embeddings(run_dir, spec.name)
        except ManifestError as e:
            recorded = read_arms(run_dir)
            for arm in arms:
                if recorded.get(arm, {}).get("status") != "not_run":
                    record_arm(run_dir, arm, status="not_run", reason=f"No {spec.title} embeddings: {e}")
            continue
        X = _aligned(manifest, table, spec.name, run_dir)
        weights = f"{info['model_id']} revision {info['revision']} sha256 {info['checksum'][:12]}"
        for arm in arms:
            head = arm.removeprefix(f"{spec.arm_prefix}_")
            chosen = {}
            for task in tasks:
                model, table_, chosen[task] = _fit_task(head, X, manifest, task, cfg)
                if table_ is not None:
                    if isinstance(model, XGBHead):  # kept for `kneeoa export`; linear probes are not packaged
                        model.save(head_path(run_dir, arm, task))
                    write_predictions(table_, run_dir, arm, task)
                _log.info("%s %s: %s", arm, task, chosen[task])
            record_arm(run_dir, arm, status="ran", weights=weights,
                       details={"encoder": spec.name, "features": info["features"], "dim": info["dim"],
                                "head": head, "tasks": chosen})
