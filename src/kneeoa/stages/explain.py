"""The explain stage: Grad-CAM montages for the CNN arms and, on phantom data, how well the maps find the feature.

For every arm with a checkpoint (RUN_DIR/checkpoints/<arm>/) and every configured task it has predictions for:

* a montage RUN_DIR/figures/gradcam/<arm>__<task>.png: rows are true classes, columns up to `explain.per_grade`
  correctly and `explain.per_grade` wrongly classified test images, each overlaid with the CAM of its *predicted*
  class (what drove the decision);
* where the manifest has `mask_path` (phantom), the CAM scores of `kneeoa.cam` over up to
  `explain.max_score_images` test images whose task mask is non-empty, with the CAM of the class that means "feature
  present" (binary tasks: class 1; KLG: the true grade), as metrics.csv rows `cam_energy_in_mask`,
  `cam_pointing_game` and their `_random` baselines (split "test", patient-bootstrap CIs of the mean), in the
  stage's own metrics part RUN_DIR/metrics/explain.csv. Which masks define a task's feature is the task's entry
  (`Task.masks`); tasks without masks are not scored.

RUN_DIR/figures/gradcam/index.json lists the montages, the random maps' smoothing and anything skipped, with why
(`kneeoa.runfolder.gradcam`).
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kneeoa import bootstrap, cam
from kneeoa.config import Config
from kneeoa.data.images import load_gray
from kneeoa.errors import DataError, WeightsNotFoundError
from kneeoa.runfolder.checkpoints import CHECKPOINTS_DIR, checkpoint_arms
from kneeoa.runfolder.gradcam import write_index, write_montage
from kneeoa.runfolder.manifest import load_knee, read_manifest, resolve_image_path
from kneeoa.runfolder.metrics import COLUMNS, write_metrics_part
from kneeoa.runfolder.predictions import prediction_path, read_predictions
from kneeoa.tasks import get_task

_logger = logging.getLogger(__name__)

CAM_METRICS = ("cam_energy_in_mask", "cam_pointing_game", "cam_energy_in_mask_random", "cam_pointing_game_random")


def _rng(seed: int, *key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32("|".join(key).encode())])


def _cams(model, layer, preprocess, run_dir: Path, rows: pd.DataFrame, classes, batch_size: int) -> list[np.ndarray]:
    """Grad-CAM maps of manifest `rows` in the orientation the model saw them (mirrored rows flipped back).

    Maps are returned in the files' own orientation, so they overlay the crops and the phantom masks as stored.
    """
    out: list[np.ndarray] = []
    records = rows.to_dict("records")
    for start in range(0, len(records), batch_size):
        part = records[start:start + batch_size]
        batch = [preprocess(load_knee(run_dir, r)) for r in part]
        maps = cam.gradcam(model, layer, torch.stack(batch), list(classes[start:start + batch_size]))
        out.extend(np.ascontiguousarray(m[:, ::-1]) if r.get("mirrored") else m for m, r in zip(maps, part,
                                                                                                  strict=True))
    return out


def select_examples(preds: pd.DataFrame, per_grade: int, rng: np.random.Generator) -> pd.DataFrame:
    """Up to `per_grade` correct and `per_grade` wrong test images per true class, with a `correct` column."""
    preds = preds.assign(pred=preds["y_pred"])
    preds["correct"] = preds["pred"] == preds["y_true"]
    picks = []
    for (_, _), group in preds.groupby(["y_true", "correct"], sort=True):
        take = rng.choice(len(group), size=min(per_grade, len(group)), replace=False)
        picks.append(group.iloc[np.sort(take)])
    return pd.concat(picks) if picks else preds.iloc[:0]


def montage(images: list[np.ndarray], cams: list[np.ndarray], chosen: pd.DataFrame, *, class_names, per_grade: int,
            title: str):
    """Matplotlib figure: one row per true class, correct then wrong examples, CAM overlays titled true/pred/p."""
    from kneeoa.plotting import new_figure

    classes = sorted(chosen["y_true"].unique())
    ncol = 2 * per_grade
    fig = new_figure(1.7 * ncol + 0.6, 2.1 * len(classes) + 0.5)
    axes = fig.subplots(len(classes), ncol, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for (_, row), img, m in zip(chosen.iterrows(), images, cams, strict=True):
        r = classes.index(row["y_true"])
        same = chosen[(chosen["y_true"] == row["y_true"]) & (chosen["correct"] == row["correct"])]
        c = list(same.index).index(row.name) + (0 if row["correct"] else per_grade)
        ax = axes[r, c]
        ax.imshow(cam.overlay(img, m))
        p = row[f"prob_{row['pred']}"]
        ax.set_title(f"true {class_names[row['y_true']]} / pred {class_names[row['pred']]}\np={p:.2f}", fontsize=7,
                     color="green" if row["correct"] else "red")
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(hspace=0.45)
    return fig


def _load_mask(run_dir: Path, mask_path: str, task: str) -> np.ndarray:
    path = resolve_image_path(run_dir, mask_path)
    try:
        with np.load(path) as npz:
            return cam.task_mask(dict(npz), task)
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"Mask file {path} cannot be used for task '{task}' ({e}). Regenerate the phantom with "
                        "`kneeoa phantom`.") from e


def _score_rows(run_dir: Path, arm: str, task: str, model, layer, preprocess, test: pd.DataFrame, preds: pd.DataFrame,
                cfg: Config) -> tuple[list[dict], float]:
    rng = _rng(cfg.explain.seed, "score", arm, task)
    rows = test.dropna(subset=["mask_path"]).merge(preds[["image_id", "y_true"]], on="image_id")
    rows = rows.iloc[rng.permutation(len(rows))]
    masks, keep = [], []
    for i, r in rows.iterrows():
        m = _load_mask(run_dir, r["mask_path"], task)
        if m.any():
            masks.append(m)
            keep.append(i)
        if len(keep) >= cfg.explain.max_score_images:
            break
    rows = rows.loc[keep]
    if rows.empty:
        return [], float("nan")
    target = np.ones(len(rows), int) if get_task(task).n_classes == 2 else rows["y_true"].to_numpy()
    maps = _cams(model, layer, preprocess, run_dir, rows, target, cfg.explain.batch_size)
    tol = max(1, round(cfg.explain.pointing_tolerance * min(masks[0].shape)))
    scores = cam.score_maps(maps, masks, tolerance=tol, rng=rng)
    codes, n_pat = bootstrap.patient_codes(rows["patient_id"])
    w = bootstrap.bootstrap_weights(codes, n_pat, cfg.stats.n_boot, rng)
    out = []
    for name in CAM_METRICS:
        x = np.nan_to_num(scores[name], nan=0.0)
        lo, hi = bootstrap.percentile_interval((w @ x) / w.sum(axis=1), cfg.stats.confidence)
        out.append({"arm": arm, "task": task, "split": "test", "metric": name, "value": float(x.mean()),
                    "ci_low": lo, "ci_high": hi, "n": len(x)})
    return out, float(scores["sigma"])


def run(run_dir: Path, cfg: Config) -> None:
    """Write Grad-CAM montages and (phantom) CAM scores for every CNN arm with a checkpoint."""
    from kneeoa.models.infer import load_classifier

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    test = manifest[manifest["split"] == "test"]
    arms = checkpoint_arms(run_dir)
    index: dict = {"montages": [], "skipped": [], "sigma_px": {}}
    rows: list[dict] = []
    for arm in arms:
        for task in cfg.tasks.names:
            path = prediction_path(run_dir, arm, task)
            if not path.exists():
                continue
            try:
                model, layer, preprocess = load_classifier(run_dir, arm, task, cam_layer=cfg.explain.cam_layer)
            except WeightsNotFoundError as e:
                index["skipped"].append({"arm": arm, "task": task, "reason": str(e)})
                continue
            _, _, preds = read_predictions(path)
            cols = ["image_id", "image_path", *(["mirrored"] if "mirrored" in test else [])]
            preds = preds[preds["split"] == "test"].merge(test[cols], on="image_id")
            chosen = select_examples(preds, cfg.explain.per_grade, _rng(cfg.explain.seed, "montage", arm, task))
            if len(chosen):
                images = [load_gray(resolve_image_path(run_dir, p)) for p in chosen["image_path"]]
                maps = _cams(model, layer, preprocess, run_dir, chosen,
                             chosen["pred"].to_numpy(), cfg.explain.batch_size)
                fig = montage(images, maps, chosen, class_names=get_task(task).classes,
                              per_grade=cfg.explain.per_grade, title=f"{arm} - {task}: Grad-CAM of the predicted class")
                rel = write_montage(fig, run_dir, arm, task)
                index["montages"].append({"arm": arm, "task": task, "file": str(rel)})
            if "mask_path" in test and get_task(task).masks:
                new, sigma = _score_rows(run_dir, arm, task, model, layer, preprocess, test, preds, cfg)
                rows.extend(new)
                index["sigma_px"][f"{arm}__{task}"] = sigma
    if not arms:
        index["skipped"].append({"arm": "*", "task": "*",
                                 "reason": f"no checkpoints under {run_dir / CHECKPOINTS_DIR}"})
    write_index(index, run_dir)
    write_metrics_part(pd.DataFrame(rows, columns=COLUMNS), run_dir, "explain")
    _logger.info("explain: %d montage(s), %d CAM score row(s)", len(index["montages"]), len(rows))

