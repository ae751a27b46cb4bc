"""Train the supervised CNN arms with Lightning and write their prediction tables.

For every backbone in `cnn.backbones`: build the model (pretrained weights if found, else random init, recorded),
train on the train split (each task's head and loss from `kneeoa.models.cnn.heads`; class-weighted loss or
class-balanced sampling), select the epoch by the tasks' headline val metric (or the val loss), optionally with an
EMA of the weights, then tune the KLG decoding on val (cut-points on the expected grade, when asked), store it in
the checkpoint and predict every split into RUN_DIR/predictions/<arm>__<task>.parquet through
`kneeoa.models.cnn.infer` -- the same code that grades new images later. With `cnn.ensemble_seeds` > 1 the backbone is
trained once per seed and the averaged arm `<backbone>_ens` is added (the first seed is the arm `<backbone>`); with
`cnn.together` the seeds train side by side in one loop on the same batches (their initial weights differ; the
batches are fetched and augmented once for all), and with `cnn.mutual` each also learns from the others
(`kneeoa.models.cnn.mutual`). What a training step does is `kneeoa.models.cnn.training`'s.
The test split is read only to write its predictions, after every choice is fixed.

Images come from the decoded uint8 cache (`kneeoa.transforms.cache`); augmentation runs on whole batches
(`kneeoa.transforms.augment`). `accelerator`, `devices`, `strategy` and `num_nodes` go to Lightning unchanged.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler

from kneeoa.config import CnnCfg, Config, backbone_cfg, cohort_cfgs
from kneeoa.errors import ConfigError
from kneeoa.models.cnn.backbones import (
    BACKBONES,
    MultiTaskNet,
    cnn_preprocess,
    create_backbone,
    input_rows,
    make_payload,
    net_from_payload,
    resolve_pretrained,
    write_checkpoint,
)
from kneeoa.models.cnn.epoch_weights import EPOCHS_DIR, epoch_weights_callback
from kneeoa.models.cnn.heads import HEADS, class_weights, decode, tune_cutpoints
from kneeoa.models.cnn.infer import CnnPredictor
from kneeoa.models.cnn.resume import (
    LAST,
    clear_finished,
    find_resume_point,
    fingerprint,
    load_finished,
    mark_finished,
    mark_started,
    save_finished,
)
from kneeoa.models.cnn.training import cohort_minutes, make_module, resolve_precision
from kneeoa.runfolder.arms import record_arm
from kneeoa.runfolder.checkpoints import CHECKPOINTS_DIR, checkpoint_path
from kneeoa.runfolder.manifest import read_manifest
from kneeoa.runfolder.predictions import make_prediction_table, write_predictions
from kneeoa.runlock import is_rank_zero
from kneeoa.tasks import available_tasks, get_task
from kneeoa.transforms.augment import POLICIES, BatchTransform
from kneeoa.transforms.cache import image_cache
from kneeoa.transforms.dataset import MISSING_LABEL, KneeDataset, task_labels
from kneeoa.transforms.preprocess import Preprocess

_logger = logging.getLogger(__name__)

def _uses_hflip(hp: CnnCfg, manifest: pd.DataFrame) -> bool:
    if hp.hflip == "auto":
        return not ("mirrored" in manifest and manifest["mirrored"].any())
    if hp.hflip not in ("true", "false"):
        raise ConfigError(f"cnn.hflip must be auto, true or false. Got {hp.hflip!r}.")
    return hp.hflip == "true"


def _train_sampler(labels: dict[str, np.ndarray], hp: CnnCfg, seed: int):
    """Shuffling, or class-balanced sampling (with replacement) on the first task's labels."""
    gen = torch.Generator().manual_seed(seed)
    if hp.class_balance != "balanced_sampling":
        return RandomSampler(range(len(next(iter(labels.values())))), generator=gen)
    y = next(iter(labels.values()))
    counts = np.bincount(y[y != MISSING_LABEL], minlength=1).astype("float64")
    w = np.where(y == MISSING_LABEL, 0.0, 1.0 / np.maximum(counts[np.clip(y, 0, None)], 1))
    return WeightedRandomSampler(torch.as_tensor(w), num_samples=len(y), replacement=True, generator=gen)


def training_loaders(train_ds: KneeDataset, val_ds: KneeDataset, hp: CnnCfg, *, seed: int, pre: Preprocess,
                     hflip: bool, channels_last: bool, rows: tuple[int, int] | None = None
                     ) -> tuple[DataLoader, DataLoader]:
    """The train and val DataLoaders: batches read from the cache, augmented (train) and normalised by `pre`, the
    network's `Preprocess` (the one its checkpoint stores).

    With `cnn.num_workers` > 0 the training batches are fetched and augmented in that many persistent worker
    processes, overlapping the model step; validation batches only need normalising and stay in the main process.
    `rows` (the backbone's `input_rows`, when it reads only a band of the image) limits augmentation to that band.
    """
    policy = POLICIES.get(hp.augment_policy) if hp.augment else None
    workers = hp.num_workers
    train_dl = DataLoader(train_ds, batch_size=hp.batch_size, sampler=_train_sampler(train_ds.labels, hp, seed),
                          drop_last=len(train_ds) > hp.batch_size, num_workers=workers, persistent_workers=workers > 0,
                          collate_fn=BatchTransform(pre, policy, hflip, channels_last, rows, hp.augment_group),
                          generator=torch.Generator().manual_seed(seed))
    val_dl = DataLoader(val_ds, batch_size=hp.batch_size, collate_fn=BatchTransform(pre, None, False, channels_last))
    return train_dl, val_dl


def train_cohort(run_dir: Path, manifest: pd.DataFrame, images: np.ndarray, backbone: str, tasks: list[str],
                 hp: CnnCfg, seeds: list[int], group: str) -> list[dict[str, Any]]:
    """Train one network per seed (all `tasks` on one backbone) in one loop: a single seed, or a cohort on shared
    batches (`cnn.together`), learning mutually with `cnn.mutual`. Returns their checkpoint payloads (not yet
    decoded), one per seed. Each network starts from its own seed's initial weights; the batches and their draws
    follow the last seed."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    if hp.class_balance not in ("none", "weighted_loss", "balanced_sampling"):
        raise ConfigError("cnn.class_balance must be none, weighted_loss or balanced_sampling. "
                          f"Got {hp.class_balance!r}.")
    if hp.select_by not in ("metric", "loss"):
        raise ConfigError(f"cnn.select_by must be metric or loss. Got {hp.select_by!r}.")
    split = manifest["split"].to_numpy()
    train_idx = np.flatnonzero(split == "train")
    if hp.max_train_images and len(train_idx) > hp.max_train_images:
        train_idx = np.sort(np.random.default_rng(seeds[0]).choice(train_idx, hp.max_train_images, replace=False))
    val_idx = np.flatnonzero(split == "val")
    if not len(train_idx) or not len(val_idx):
        raise ConfigError(f"Training {backbone} needs train and val images; the manifest has {len(train_idx)} train "
                          f"and {len(val_idx)} val rows. Check data.split_fractions.")
    who = f"seed{seeds[0]}" if len(seeds) == 1 else "seeds" + "-".join(map(str, seeds))
    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR / backbone / "lightning" / f"{group}-{who}"
    key = fingerprint(hp, backbone=backbone, tasks=tasks, seeds=seeds, group=group,
                      images=manifest["image_id"].iloc[np.r_[train_idx, val_idx]].tolist())
    finished = load_finished(ckpt_dir, key)
    if finished is not None:
        _logger.info("%s (%s): finished in an earlier, interrupted run; reusing it (%s)", backbone, who, ckpt_dir)
        return finished if is_rank_zero() else [{}] * len(seeds)
    bb = BACKBONES.get(backbone)
    source, source_text = resolve_pretrained(bb, hp.pretrained, hp.weights.get(backbone))
    modules = []
    for seed in seeds:
        L.seed_everything(seed, workers=True, verbose=False)
        module, hub_error = create_backbone(backbone, source=source, args=hp.backbone_args)
        if hub_error:  # the cohort's later networks start from random weights too, without asking the hub again
            source = None
            source_text = f"random init: loading {bb.hub_id} from the hub failed ({hub_error.splitlines()[0][:200]})"
        _logger.info("%s (seed %d): starting weights: %s", backbone, seed, source_text)
        modules.append(module)
    pre = cnn_preprocess(module, hp.image_size, mirror_left=bool(manifest.get("mirrored", pd.Series(False)).any()),
                         tta=hp.tta)
    channels_last = bb.channels_last if hp.channels_last == "auto" else hp.channels_last in ("true", "True", True)
    precision = resolve_precision(hp.precision, hp.accelerator)
    train_ds = KneeDataset(images, train_idx, task_labels(manifest.iloc[train_idx], tasks))
    val_ds = KneeDataset(images, val_idx, task_labels(manifest.iloc[val_idx], tasks))
    train_dl, val_dl = training_loaders(train_ds, val_ds, hp, seed=seeds[-1], pre=pre,
                                        hflip=_uses_hflip(hp, manifest), channels_last=channels_last,
                                        rows=input_rows(module, hp.image_size))
    weights = {t: (class_weights(train_ds.labels[t], get_task(t).n_classes, hp.class_weight_power)
                   if hp.class_balance == "weighted_loss" else torch.ones(get_task(t).n_classes)) for t in tasks}
    heads = {t: (hp.klg_head if get_task(t).kind == "ordinal" else "ce") for t in tasks}
    nets = [MultiTaskNet(m, {t: get_task(t).n_classes for t in tasks}, heads) for m in modules]
    if channels_last:
        nets = [net.to(memory_format=torch.channels_last) for net in nets]
    lm = make_module(nets, weights, hp, steps_per_epoch=max(1, len(train_dl)))
    monitor, mode = ("val_score", "max") if hp.select_by == "metric" else ("val_loss", "min")
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode=mode, save_top_k=1,
                           enable_version_counter=False)
    # Every epoch's end, for an interrupted run to resume from: Lightning's save_last writes only when `best` does.
    latest = ModelCheckpoint(dirpath=ckpt_dir, filename=Path(LAST).stem, save_top_k=1, enable_version_counter=False)
    callbacks = [EarlyStopping(monitor=monitor, patience=hp.patience, mode=mode), best, latest]
    if hp.keep_epoch_weights:
        callbacks.append(epoch_weights_callback(ckpt_dir / EPOCHS_DIR, seeds))
    resume = find_resume_point(ckpt_dir, key)
    if resume is not None:
        _logger.info("%s (%s): resuming from %s after epoch %d of %d", backbone, who, resume.path,
                     resume.epochs_done, hp.epochs)
    elif is_rank_zero():
        mark_started(ckpt_dir, key)
        shutil.rmtree(ckpt_dir / EPOCHS_DIR, ignore_errors=True)  # an earlier training's epochs are not this one's
    cap = cohort_minutes(hp, len(seeds))
    trainer = L.Trainer(
        max_epochs=hp.epochs, accelerator=hp.accelerator, devices=hp.devices, strategy=hp.strategy,
        num_nodes=hp.num_nodes, precision=precision, deterministic=False, enable_model_summary=False,
        max_time={"minutes": cap} if cap else None,
        callbacks=callbacks,
        logger=CSVLogger(Path(run_dir) / "logs", name=f"{backbone}-{group}-{who}"), log_every_n_steps=10,
        default_root_dir=run_dir)
    t0 = time.time()
    trainer.fit(lm, train_dl, val_dl, ckpt_path=resume.path if resume else None)
    minutes = (time.time() - t0) / 60
    if not trainer.is_global_zero:
        return [{}] * len(seeds)
    mark_finished(ckpt_dir)
    if best.best_model_path:
        lm.load_state_dict(torch.load(best.best_model_path, map_location="cpu", weights_only=False)["state_dict"])
    score = float(best.best_model_score) if best.best_model_score is not None else None
    extra = {"epochs_run": int(trainer.current_epoch), "minutes": round(minutes, 2), "best_epoch_score": score,
             "selected_by": monitor, "precision": precision, "channels_last": channels_last,
             "augment_policy": hp.augment_policy if hp.augment else None,
             "resumed_after_epoch": resume.epochs_done if resume else None}
    if len(seeds) > 1:
        extra.update(cohort=seeds, mutual=hp.mutual)  # trained together
    payloads = [make_payload(net.cpu().eval().to(memory_format=torch.contiguous_format), backbone=backbone,
                             backbone_args=hp.backbone_args, preprocess=pre, weights_source=source_text,
                             extra={"seed": seed, **extra})
                for seed, net in zip(seeds, lm.scored, strict=True)]
    save_finished(ckpt_dir, key, payloads)
    return payloads


def finish_arm(run_dir: Path, arm: str, groups: dict[str, list[dict[str, Any]]], manifest: pd.DataFrame,
               images: np.ndarray, hp: CnnCfg) -> dict[str, Any]:
    """Predict every image with an arm's members, fix its decoding on val, save its checkpoints and tables.

    Cut-points (when `cnn.klg_decode: cutpoints`) are tuned on the val rows only and stored in the checkpoint
    before any test prediction is decoded.
    """
    predictor = CnnPredictor([[(net_from_payload(p), p) for p in members] for members in groups.values()])
    probs = predictor.predict_uint8(images, batch_size=hp.batch_size, progress=True)
    val = (manifest["split"] == "val").to_numpy()
    decoding = {}
    for t, pr in probs.items():
        y = manifest[t].to_numpy(dtype="float64", na_value=np.nan)
        keep = val & np.isfinite(y)
        if get_task(t).kind == "ordinal" and hp.klg_decode == "cutpoints" and keep.any():
            cuts = tune_cutpoints(y[keep].astype(int), pr[keep], groups=manifest["patient_id"].to_numpy()[keep],
                                  n_boot=hp.cutpoint_bootstrap, accuracy_weight=hp.cutpoint_accuracy_weight)
            decoding[t] = {"method": "cutpoints", "cuts": cuts}
        elif hp.klg_decode not in ("argmax", "cutpoints"):
            raise ConfigError(f"cnn.klg_decode must be argmax or cutpoints. Got {hp.klg_decode!r}.")
        else:
            decoding[t] = {"method": "argmax"}
    for group, members in groups.items():
        for p in members:
            p["decoding"] = {t: decoding[t] for t in p["tasks"]}
        write_checkpoint(checkpoint_path(run_dir, arm, group), members)
    for t, pr in probs.items():
        has = manifest[t].notna().to_numpy()
        table = make_prediction_table(manifest["image_id"][has], manifest["split"][has],
                                      manifest[t][has].astype(int), pr[has], y_pred=decode(pr[has], decoding[t]))
        write_predictions(table, run_dir, arm, t)
    return decoding


def run(run_dir: Path, cfg: Config) -> None:
    """Train every configured backbone (stage `train`), one seed or an ensemble of seeds."""
    manifest = read_manifest(run_dir)
    tasks = available_tasks(manifest, cfg.tasks.names)
    for name in cfg.tasks.names:
        if name not in tasks:
            _logger.warning("task %s has no labels in this dataset; the CNN arms skip it", name)
    for backbone in cfg.cnn.backbones:
        BACKBONES.get(backbone)
        hp = backbone_cfg(cfg.cnn, backbone)
        HEADS.get(hp.klg_head)
        cohorts = cohort_cfgs(hp, cfg.seed)
        for _, member_hp in cohorts:
            POLICIES.get(member_hp.augment_policy)
        images = image_cache(run_dir, manifest, hp.image_size)
        task_groups = {"multitask": tasks} if hp.multitask else {t: [t] for t in tasks}
        seeds = [seed for cohort, _ in cohorts for seed in cohort]
        members = {g: [p for c, member_hp in cohorts
                       for p in train_cohort(run_dir, manifest, images, backbone, ts, member_hp, c, g)]
                   for g, ts in task_groups.items()}
        if not all(all(m) for m in members.values()):
            continue  # not the global-zero process of a distributed run: rank 0 writes the results
        arms = {backbone: {g: m[:1] for g, m in members.items()}}
        if len(seeds) > 1:
            arms[f"{backbone}_ens"] = members
        first = next(iter(members.values()))[0]
        for arm, groups in arms.items():
            decoding = finish_arm(run_dir, arm, groups, manifest, images, hp)
            details = {g: [m["extra"] for m in ms] for g, ms in groups.items()}
            record_arm(run_dir, arm, status="ran", weights=first["weights_source"],
                       details={"members": details, "decoding": decoding, "head": hp.klg_head, "tta": hp.tta,
                                "ema": hp.ema, "class_balance": hp.class_balance,
                                "class_weight_power": hp.class_weight_power, "image_size": hp.image_size,
                                "backbone_args": hp.backbone_args})
    for backbone in cfg.cnn.backbones:  # every arm is written: a rerun of the stage trains afresh
        clear_finished(Path(run_dir) / CHECKPOINTS_DIR / backbone / "lightning")
