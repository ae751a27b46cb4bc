"""Explanation maps scored against the phantom's feature masks, as metrics rows with patient-bootstrap CIs.

The explain stage scores two kinds of map the same way: Grad-CAMs (`cam_*` rows) and occlusion maps
(`occlusion_*` rows). `scored_rows` picks the images of the explained split (a seeded permutation of those with a
mask file, keeping the first ones whose task mask is non-empty), their masks and the class each map explains (binary
tasks: class 1, "feature present"; KLG: the true grade); `metric_rows` turns maps of those images into the rows of
`kneeoa.explain.cam.score_maps`' four scores. Taking the rows from one permutation makes a shorter list the head of a
longer one, so occlusion maps are scored on the first of the images the CAMs are scored on. The stage says where a
row's mask file is (`mask_file`: a manifest `mask_path` -> the file), so nothing here knows the run folder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kneeoa.config import Config
from kneeoa.errors import DataError
from kneeoa.explain import cam
from kneeoa.stats import bootstrap
from kneeoa.tasks import get_task

#: The four scores of `cam.score_maps`, as that function names them (the Grad-CAM rows).
SCORES = ("cam_energy_in_mask", "cam_pointing_game", "cam_energy_in_mask_random", "cam_pointing_game_random")


def metric_names(prefix: str) -> tuple[str, ...]:
    """The metrics rows' names for maps of one kind: `cam_energy_in_mask`, ... or `occlusion_energy_in_mask`, ..."""
    return tuple(f"{prefix}_{s.removeprefix('cam_')}" for s in SCORES)


def load_task_mask(path: Path, task: str) -> np.ndarray:
    """The boolean mask of `task`'s feature in one image's mask file (`cam.task_mask`).

    Raises:
        DataError: the file cannot be read or lacks the task's arrays (names the file and the fix).
    """
    try:
        with np.load(path) as npz:
            return cam.task_mask(dict(npz), task)
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"Mask file {path} cannot be used for task '{task}' ({e}). Regenerate the phantom with "
                        "`kneeoa phantom`.") from e


def scored_rows(mask_file: Callable[[str], Path], part: pd.DataFrame, preds: pd.DataFrame, task: str, limit: int,
                rng: np.random.Generator) -> tuple[pd.DataFrame, list[np.ndarray], np.ndarray]:
    """Up to `limit` rows of `part` whose task mask is non-empty, their masks and the class each map explains.

    Args:
        mask_file: a row's `mask_path` -> its file (the stage resolves it against the run folder).
        part: the manifest's rows of the explained split (with mask_path and patient_id).
        preds: the arm's prediction table (image_id, y_true).
        rng: draws the order the rows are taken in (the same seed gives the same rows, whatever `limit`).
    """
    rows = part.dropna(subset=["mask_path"]).merge(preds[["image_id", "y_true"]], on="image_id")
    rows = rows.iloc[rng.permutation(len(rows))]
    masks, keep = [], []
    for i, r in rows.iterrows():
        if len(keep) >= limit:
            break
        m = load_task_mask(mask_file(r["mask_path"]), task)
        if m.any():
            masks.append(m)
            keep.append(i)
    rows = rows.loc[keep]
    target = np.ones(len(rows), int) if get_task(task).n_classes == 2 else rows["y_true"].to_numpy(dtype=int)
    return rows, masks, target


def metric_rows(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], rows: pd.DataFrame, *, arm: str, task: str,
                prefix: str, cfg: Config, rng: np.random.Generator) -> tuple[list[dict], float]:
    """Metrics rows (split `cfg.explain.split`, the mean over images with a patient-bootstrap CI) of the maps' four
    scores.

    Returns:
        (rows named `metric_names(prefix)`, the random maps' smoothing sigma in pixels).
    """
    tol = max(1, round(cfg.explain.pointing_tolerance * min(masks[0].shape)))
    scores = cam.score_maps(maps, masks, tolerance=tol, rng=rng)
    codes, n_pat = bootstrap.patient_codes(rows["patient_id"])
    w = bootstrap.bootstrap_weights(codes, n_pat, cfg.stats.n_boot, rng)
    out = []
    for score, name in zip(SCORES, metric_names(prefix), strict=True):
        x = np.nan_to_num(scores[score], nan=0.0)
        lo, hi = bootstrap.percentile_interval((w @ x) / w.sum(axis=1), cfg.stats.confidence)
        out.append({"arm": arm, "task": task, "split": cfg.explain.split, "metric": name, "value": float(x.mean()),
                    "ci_low": lo, "ci_high": hi, "n": len(x)})
    return out, float(scores["sigma"])
