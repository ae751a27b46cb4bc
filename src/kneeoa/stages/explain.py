"""The explain stage: where each arm looks, as Grad-CAM and occlusion montages and, on phantom data, how well the maps
find the feature.

Two kinds of map (`MAPS`), each for every arm it can explain and every configured task the arm has predictions for:

* **Grad-CAM** (`kneeoa.explain.cam`), for every arm with a checkpoint (RUN_DIR/checkpoints/<arm>/) and every
  linear-probe encoder arm (through the encoder's real architecture, `kneeoa.arms.encoder_cam`): montages in
  RUN_DIR/figures/gradcam/ (`kneeoa.runfolder.montages.GRADCAM`);
* **occlusion** (`kneeoa.explain.occlusion`, when `explain.occlusion` is on), for every arm whose model can be re-run
  on new crops (`kneeoa.arms.predictors`: CNNs, encoder + XGBoost or linear arms, zero-shot arms, fused arms):
  montages in RUN_DIR/figures/occlusion/ (`kneeoa.runfolder.montages.OCCLUSION`); arms that cannot be re-run (a missing
  weights file, an unknown kind) are listed in its index with why.

A montage RUN_DIR/figures/<kind>/<arm>__<task>.png: rows are true classes, columns up to `explain.per_grade`
correctly and `explain.per_grade` wrongly classified images of `explain.split` (default test; val for a run whose
test split is held out), each overlaid with the map of its *predicted* class (what drove the decision). Both kinds
draw the same knees (the same seeded choice per arm x task).

Where the manifest has `mask_path` (phantom), the maps are scored against the task's feature mask
(`kneeoa.explain.mask_scores`): Grad-CAMs over up to `explain.max_score_images` images of that split whose task mask is
non-empty, occlusion maps over the first `explain.occlusion_images` of the same images, each with the map of the
class that means "feature present" (binary tasks: class 1; KLG: the true grade), as metrics.csv rows
`cam_energy_in_mask`, `cam_pointing_game`, `occlusion_energy_in_mask`, `occlusion_pointing_game` and their `_random`
baselines (patient-bootstrap CIs of the mean), in the stage's own metrics part RUN_DIR/metrics/explain.csv. Which
masks define a task's feature is the task's entry (`Task.masks`); tasks without masks are not scored.

Each kind's index.json lists the montages, the random maps' smoothing and anything skipped, with why.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kneeoa.arms.predictors import NoArmPredictor, arm_predictor
from kneeoa.config import Config
from kneeoa.errors import MissingInputError, WeightsNotFoundError
from kneeoa.explain import cam
from kneeoa.explain.mask_scores import metric_names, metric_rows, scored_rows
from kneeoa.explain.occlusion import occlusion_map
from kneeoa.formats.images import load_gray
from kneeoa.registry import Registry
from kneeoa.runfolder.checkpoints import CHECKPOINTS_DIR, arm_dir, checkpoint_arms
from kneeoa.runfolder.manifest import load_knee, read_manifest, resolve_image_path
from kneeoa.runfolder.metrics import COLUMNS, write_metrics_part
from kneeoa.runfolder.montages import GRADCAM, OCCLUSION, MontageFolder
from kneeoa.runfolder.predictions import PREDICTIONS_DIR, list_predictions, prediction_path, read_predictions
from kneeoa.tasks import get_task

_logger = logging.getLogger(__name__)

CAM_METRICS = metric_names("cam")
OCCLUSION_METRICS = metric_names("occlusion")

#: Maps of manifest rows for one class each, in the files' orientation: (rows, classes) -> [(H, W) in [0, 1]].
RowMaps = Callable[[pd.DataFrame, Sequence[int]], list[np.ndarray]]


def _rng(seed: int, *key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32("|".join(key).encode())])


def _as_stored(maps: list[np.ndarray], records: list[dict]) -> list[np.ndarray]:
    """Maps computed in the orientation the models saw (mirrored rows flipped), flipped back to the files' own, so
    they overlay the crops and the phantom masks as stored."""
    return [np.ascontiguousarray(m[:, ::-1]) if r.get("mirrored") else m for m, r in zip(maps, records, strict=True)]


def _gradcam_maps(run_dir: Path, arm: str, task: str, cfg: Config) -> RowMaps:
    """Grad-CAMs, in batches: of a CNN arm's (first member's) network on the block `explain.cam_layer` names, or of a
    linear-probe arm through its encoder's own architecture (`kneeoa.arms.encoder_cam`: a ViT block's tokens
    folded into the patch grid, or the knee CNN's last block)."""
    from kneeoa.arms.encoder_cam import encoder_arm_classifier
    from kneeoa.models.cnn.infer import load_classifier

    if arm in checkpoint_arms(run_dir):
        model, layer, preprocess = load_classifier(arm_dir(run_dir, arm), task, cam_layer=cfg.explain.cam_layer)
        reshape = None
    else:
        model, layer, preprocess, reshape = encoder_arm_classifier(run_dir, arm, task, cfg)
    size = cfg.explain.batch_size

    def maps(rows: pd.DataFrame, classes: Sequence[int]) -> list[np.ndarray]:
        records, out = rows.to_dict("records"), []
        for start in range(0, len(records), size):
            batch = torch.stack([preprocess(load_knee(run_dir, r)) for r in records[start:start + size]])
            out.extend(cam.gradcam(model, layer, batch, list(classes[start:start + size]),
                                   reshape_transform=reshape))
        return _as_stored(out, records)

    return maps


def _gradcam_arms(run_dir: Path, cfg: Config) -> list[str]:
    """CNN arms (checkpoints) and linear-probe encoder arms: the arms gradients flow through."""
    from kneeoa.arms.encoder_cam import probe_arms

    return sorted(set(checkpoint_arms(run_dir)) | set(probe_arms(run_dir)))


def _occlusion_maps(run_dir: Path, arm: str, task: str, cfg: Config) -> RowMaps:
    """Occlusion maps of the arm re-run on occluded copies of each crop (`explain.occlusion_*` settings)."""
    predict, ex = arm_predictor(run_dir, arm, task, cfg), cfg.explain

    def maps(rows: pd.DataFrame, classes: Sequence[int]) -> list[np.ndarray]:
        records = rows.to_dict("records")
        return _as_stored([occlusion_map(predict, load_knee(run_dir, r), int(c), patch=ex.occlusion_patch,
                                         stride=ex.occlusion_stride, batch=ex.occlusion_batch)
                           for r, c in zip(records, classes, strict=True)], records)

    return maps


def _prediction_arms(run_dir: Path, cfg: Config) -> list[str]:
    return sorted({p.stem.partition("__")[0] for p in list_predictions(run_dir)
                   if p.stem.partition("__")[2] in cfg.tasks.names})


@dataclass(frozen=True)
class MapKind:
    """One kind of explanation map.

    Attributes:
        title: what the montages and logs call it. folder: where its figures go. prefix: of its metrics rows.
        enabled: whether the config asks for it. arms: the arms it may explain. none: why there is no arm.
        load: (run_dir, arm, task, cfg) -> RowMaps; raises WeightsNotFoundError or NoArmPredictor to skip the arm.
        score_images: how many images per arm x task are scored against masks. settings: what made the maps, for
            the index.
    """

    title: str
    folder: MontageFolder
    prefix: str
    enabled: Callable[[Config], bool]
    arms: Callable[[Path, Config], list[str]]
    none: Callable[[Path], str]
    load: Callable[[Path, str, str, Config], RowMaps]
    score_images: Callable[[Config], int]
    settings: Callable[[Config], dict]


MAPS: Registry[MapKind] = Registry("kind of explanation map")
MAPS.add("gradcam", MapKind(
    title="Grad-CAM", folder=GRADCAM, prefix="cam", enabled=lambda cfg: True,
    arms=_gradcam_arms,
    none=lambda run_dir: f"no checkpoints under {run_dir / CHECKPOINTS_DIR} and no linear-probe arms",
    load=_gradcam_maps,
    score_images=lambda cfg: cfg.explain.max_score_images,
    settings=lambda cfg: {"cam_layer": cfg.explain.cam_layer}))
MAPS.add("occlusion", MapKind(
    title="occlusion map", folder=OCCLUSION, prefix="occlusion", enabled=lambda cfg: cfg.explain.occlusion,
    arms=_prediction_arms, none=lambda run_dir: f"no prediction tables under {run_dir / PREDICTIONS_DIR}",
    load=_occlusion_maps, score_images=lambda cfg: cfg.explain.occlusion_images,
    settings=lambda cfg: {"patch": cfg.explain.occlusion_patch, "stride": cfg.explain.occlusion_stride,
                          "fill": "image mean"}))


def select_examples(preds: pd.DataFrame, per_grade: int, rng: np.random.Generator) -> pd.DataFrame:
    """Up to `per_grade` correct and `per_grade` wrong images per true class, with a `correct` column."""
    preds = preds.assign(pred=preds["y_pred"])
    preds["correct"] = preds["pred"] == preds["y_true"]
    picks = []
    for (_, _), group in preds.groupby(["y_true", "correct"], sort=True):
        take = rng.choice(len(group), size=min(per_grade, len(group)), replace=False)
        picks.append(group.iloc[np.sort(take)])
    return pd.concat(picks) if picks else preds.iloc[:0]


def montage(images: list[np.ndarray], cams: list[np.ndarray], chosen: pd.DataFrame, *, class_names, per_grade: int,
            title: str):
    """Matplotlib figure: one row per true class, correct then wrong examples, map overlays titled true/pred/p."""
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


def _split_predictions(path: Path, part: pd.DataFrame) -> pd.DataFrame:
    """The rows of a prediction table for the manifest rows `part` (one split), with their image path (and
    mirroring)."""
    _, _, preds = read_predictions(path)
    cols = ["image_id", "image_path", *(["mirrored"] if "mirrored" in part else [])]
    return preds.merge(part[cols], on="image_id")


def _explain(kind: MapKind, run_dir: Path, part: pd.DataFrame, cfg: Config) -> list[dict]:
    """One kind's montages and index for every arm x task it can explain; returns its mask-score rows."""
    arms = kind.arms(run_dir, cfg)
    index: dict = {"montages": [], "skipped": [], "sigma_px": {}, "settings": kind.settings(cfg)}
    rows: list[dict] = []
    for arm in arms:
        for task in cfg.tasks.names:
            path = prediction_path(run_dir, arm, task)
            if not path.exists():
                continue
            try:
                maps = kind.load(run_dir, arm, task, cfg)
            except (WeightsNotFoundError, MissingInputError, NoArmPredictor) as e:
                index["skipped"].append({"arm": arm, "task": task, "reason": str(e)})
                continue
            preds = _split_predictions(path, part)
            chosen = select_examples(preds, cfg.explain.per_grade, _rng(cfg.explain.seed, "montage", arm, task))
            if len(chosen):
                images = [load_gray(resolve_image_path(run_dir, p)) for p in chosen["image_path"]]
                fig = montage(images, maps(chosen, chosen["pred"].to_numpy()), chosen,
                              class_names=get_task(task).classes, per_grade=cfg.explain.per_grade,
                              title=f"{arm} - {task}: {kind.title} of the predicted class")
                index["montages"].append({"arm": arm, "task": task,
                                          "file": str(kind.folder.write_montage(fig, run_dir, arm, task))})
            if "mask_path" in part and get_task(task).masks and kind.score_images(cfg):
                rng = _rng(cfg.explain.seed, "score", arm, task)
                scored, masks, target = scored_rows(partial(resolve_image_path, run_dir), part, preds, task,
                                                    kind.score_images(cfg), rng)
                sigma = float("nan")
                if masks:
                    new, sigma = metric_rows(maps(scored, target), masks, scored, arm=arm, task=task,
                                             prefix=kind.prefix, cfg=cfg, rng=rng)
                    rows.extend(new)
                index["sigma_px"][f"{arm}__{task}"] = sigma
    if not arms:
        index["skipped"].append({"arm": "*", "task": "*", "reason": kind.none(run_dir)})
    kind.folder.write_index(index, run_dir)
    _logger.info("explain: %d %s montage(s), %d score row(s)", len(index["montages"]), kind.title, len(rows))
    return rows


def run(run_dir: Path, cfg: Config) -> None:
    """Write the montages and (phantom) mask scores of every kind of map the config asks for.

    A kind that is off has its figures of an earlier run removed, so the report never shows maps of other models.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    part = manifest[manifest["split"] == cfg.explain.split]
    rows: list[dict] = []
    for _, kind in MAPS.items():
        if kind.enabled(cfg):
            rows.extend(_explain(kind, run_dir, part, cfg))
        elif kind.folder.remove(run_dir):
            _logger.info("explain: %s is off; removed the earlier run's %s", kind.title, run_dir / kind.folder.folder)
    write_metrics_part(pd.DataFrame(rows, columns=COLUMNS), run_dir, "explain")


def outcome(run_dir: Path, cfg: Config) -> tuple[list[str], bool]:
    """What the stage made: montages and skipped arms per kind of map, and whether it drew any montage
    (`kneeoa explain` exits 1 otherwise)."""
    lines, made = [], False
    for _, kind in MAPS.items():
        index = kind.folder.read_index(run_dir) if kind.enabled(cfg) else None
        if index is not None:
            made |= bool(index["montages"])
            lines.append(f"{kind.title}: {len(index['montages'])} montage(s), {len(index['skipped'])} skipped")
    return lines, made
