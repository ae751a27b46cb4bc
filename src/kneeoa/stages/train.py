"""Train the supervised CNN arms with Lightning and write their prediction tables.

For every backbone in `cnn.backbones`: build the model (pretrained weights if found, else random init, recorded),
train on the train split (each task's head and loss from `kneeoa.models.cnn.heads`; class-weighted loss or
class-balanced sampling), select the epoch by the tasks' headline val metric (or the val loss), optionally with an
EMA of the weights, then tune the KLG decoding on val (cut-points on the expected grade, when asked), store it in
the checkpoint and predict every split into RUN_DIR/predictions/<arm>__<task>.parquet through
`kneeoa.models.cnn.infer` -- the same code that grades new images later. With `cnn.ensemble_seeds` > 1 the backbone is
trained once per seed and the averaged arm `<backbone>_ens` is added (the first seed is the arm `<backbone>`).
The test split is read only to write its predictions, after every choice is fixed.

Images come from the decoded uint8 cache (`kneeoa.transforms.cache`); augmentation runs on whole batches
(`kneeoa.transforms.augment`). `accelerator`, `devices`, `strategy` and `num_nodes` go to Lightning unchanged.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler

from kneeoa.config import CnnCfg, Config, backbone_cfg
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
from kneeoa.models.cnn.heads import HEADS, class_weights, decode, tune_cutpoints
from kneeoa.models.cnn.infer import CnnPredictor
from kneeoa.models.cnn.mixup import mix_batch
from kneeoa.models.cnn.resume import (
    clear_finished,
    find_resume_point,
    fingerprint,
    load_finished,
    mark_finished,
    mark_started,
    save_finished,
)
from kneeoa.runfolder.arms import record_arm
from kneeoa.runfolder.checkpoints import CHECKPOINTS_DIR, checkpoint_path
from kneeoa.runfolder.manifest import read_manifest
from kneeoa.runfolder.predictions import make_prediction_table, write_predictions
from kneeoa.runlock import is_rank_zero
from kneeoa.stats.metrics import METRICS
from kneeoa.tasks import available_tasks, get_task
from kneeoa.transforms.augment import POLICIES, BatchTransform
from kneeoa.transforms.cache import image_cache
from kneeoa.transforms.dataset import MISSING_LABEL, KneeDataset, task_labels
from kneeoa.transforms.preprocess import Preprocess

_logger = logging.getLogger(__name__)

BUDGET_KEY = "kneeoa_budget_spent_s"  # checkpoint entry: seconds the learning-rate schedule had spent


def resolve_precision(precision: str, accelerator: str) -> str:
    """'auto' -> bf16-mixed on bf16-capable CPUs or GPUs, 16-mixed on other GPUs, else 32-true."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


class TrainingBudget:
    """Warm-up then cosine decay of the learning rate over the planned steps, or over `max_minutes` if that ends first.

    Progress is the larger of steps done / steps planned and minutes spent / `max_minutes`, so a run stopped by its
    time cap (Lightning's `max_time`) has still annealed its learning rate instead of stopping at its peak. The
    clock only counts once it is past the warm-up share: the first steps are slow (allocation, caches) and would
    otherwise let the clock lead for a few steps by chance, so that two runs with one seed differ. A run that keeps
    pace with its plan is thus scheduled by steps alone, the same on every run.
    `spent_s` is the time an interrupted run had already spent (restored from its checkpoint on resume).
    """

    def __init__(self, total_steps: int, max_minutes: float | None, warmup: float = 0.15, floor: float = 0.01,
                 clock=time.monotonic, spent_s: float = 0.0) -> None:
        self.total_steps, self.max_seconds = max(1, total_steps), (max_minutes * 60 if max_minutes else None)
        self.warmup, self.floor, self.clock, self.start, self.spent_s = warmup, floor, clock, None, spent_s

    def elapsed(self) -> float:
        """Seconds spent so far, earlier interrupted runs included."""
        return self.spent_s + (self.clock() - self.start if self.start is not None else 0.0)

    def progress(self, step: int) -> float:
        if self.start is None:
            self.start = self.clock()
        p = step / self.total_steps
        if self.max_seconds and (by_clock := self.elapsed() / self.max_seconds) >= self.warmup:
            p = max(p, by_clock)
        return min(p, 1.0)

    def lr_factor(self, step: int) -> float:
        p = self.progress(step)
        if p < self.warmup:
            return max(self.floor, p / self.warmup)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * (p - self.warmup) / (1 - self.warmup)))


def val_score(task: str, y: np.ndarray, probs: np.ndarray, decoding_method: str) -> float:
    """The task's headline val metric under the arm's decoding (cut-points tuned on these very labels, as at the end).

    NaN when fewer than two classes are labelled.
    """
    keep = y != MISSING_LABEL
    y, probs = y[keep], probs[keep]
    if len(np.unique(y)) < 2:
        return float("nan")
    t = get_task(task)
    pred = None
    if t.kind == "ordinal" and decoding_method == "cutpoints":
        pred = decode(probs, {"method": "cutpoints", "cuts": tune_cutpoints(y, probs)})
    return float(METRICS.get(t.headline_metric).fn(y, probs, pred=pred))


def _make_module(net: MultiTaskNet, weights: dict[str, torch.Tensor], hp: CnnCfg, *, steps_per_epoch: int):
    import lightning as L

    class KneeModule(L.LightningModule):
        """Sum of the tasks' head losses (blended over mixup pairs with `cnn.mixup`); AdamW, warm-up + cosine over
        the planned steps or the time cap. Batches arrive augmented and normalised (`training_loaders`); the training
        loss is logged once per epoch."""

        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.class_weights = weights
            self.ema = None
            self._loss_sum, self._loss_n = 0.0, 0  # this epoch's training loss summed over images, and the images
            if hp.ema:
                from timm.utils import ModelEmaV3

                self.ema = ModelEmaV3(net, decay=hp.ema)

        @property
        def scored(self) -> MultiTaskNet:
            """The weights validation and the checkpoint use: the EMA when on."""
            return self.ema.module if self.ema is not None else self.net

        def _loss(self, out, y) -> torch.Tensor:
            total = 0.0
            for t, w in self.class_weights.items():
                if (y[t] != MISSING_LABEL).any():
                    total = total + HEADS.get(self.net.head_names[t]).loss(out[t].float(), y[t], w, hp.label_smoothing)
            return total

        def training_step(self, batch, _):
            x, mates, lam = mix_batch(*batch, hp.mixup)  # mates None, lam 1 without mixup
            out = self.net(x)
            loss = lam * self._loss(out, batch[1]) + (self._loss(out, mates) * (1 - lam) if mates else 0.0)
            self._loss_sum, self._loss_n = self._loss_sum + loss.detach() * len(batch[0]), self._loss_n + len(batch[0])
            return loss

        def on_train_epoch_end(self) -> None:  # logged once an epoch: `self.log` each step costs ~1 % of a CPU step
            if self._loss_n:
                self.log("train_loss", self._loss_sum / self._loss_n, prog_bar=True)
            self._loss_sum, self._loss_n = 0.0, 0

        def transfer_batch_to_device(self, batch, device, dataloader_idx):
            if device.type == "cpu":  # the loaders' batches are CPU tensors already: skip Lightning's walk over them
                return batch
            return super().transfer_batch_to_device(batch, device, dataloader_idx)

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            if self.ema is not None:
                self.ema.update(self.net)

        def on_validation_epoch_start(self) -> None:
            self._val: dict[str, list] = {}

        def validation_step(self, batch, _):
            x, y = batch
            out = self.scored(x)
            self.log("val_loss", self._loss(out, y), prog_bar=True, on_epoch=True, on_step=False,
                     batch_size=len(x), sync_dist=True)
            for t, p in self.scored.probs(out).items():
                self._val.setdefault(t, []).append((y[t], p.float()))

        def on_validation_epoch_end(self) -> None:
            scores = []
            for t, parts in self._val.items():
                y, probs = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
                if self.trainer.world_size > 1:  # score the whole val set on every rank: same value, same logging
                    y, probs = self.all_gather(y).flatten(0, 1), self.all_gather(probs).flatten(0, 1)
                value = val_score(t, y.cpu().numpy(), probs.cpu().numpy(), hp.klg_decode)
                if np.isfinite(value):
                    self.log(f"val_{t}_{get_task(t).headline_metric}", value, prog_bar=get_task(t).primary,
                             sync_dist=True)
                    scores.append(value)
            self.log("val_score", float(np.mean(scores)) if scores else 0.0, sync_dist=True)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
            self.budget = TrainingBudget(hp.epochs * steps_per_epoch, hp.max_minutes,
                                         spent_s=getattr(self, "budget_spent_s", 0.0))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, self.budget.lr_factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def on_save_checkpoint(self, checkpoint: dict) -> None:
            checkpoint[BUDGET_KEY] = self.budget.elapsed()  # the schedule's clock, for a resumed run

        def on_load_checkpoint(self, checkpoint: dict) -> None:
            self.budget_spent_s = float(checkpoint.get(BUDGET_KEY, 0.0))  # runs before configure_optimizers

    return KneeModule()


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


def train_member(run_dir: Path, manifest: pd.DataFrame, images: np.ndarray, backbone: str, tasks: list[str],
                 hp: CnnCfg, seed: int, group: str) -> dict[str, Any]:
    """Train one network (all `tasks` on one backbone, one seed); returns its checkpoint payload (not yet decoded)."""
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
        train_idx = np.sort(np.random.default_rng(seed).choice(train_idx, hp.max_train_images, replace=False))
    val_idx = np.flatnonzero(split == "val")
    if not len(train_idx) or not len(val_idx):
        raise ConfigError(f"Training {backbone} needs train and val images; the manifest has {len(train_idx)} train "
                          f"and {len(val_idx)} val rows. Check data.split_fractions.")
    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR / backbone / "lightning" / f"{group}-seed{seed}"
    key = fingerprint(hp, backbone=backbone, tasks=tasks, seed=seed, group=group,
                      images=manifest["image_id"].iloc[np.r_[train_idx, val_idx]].tolist())
    finished = load_finished(ckpt_dir, key)
    if finished is not None:
        _logger.info("%s (seed %d): finished in an earlier, interrupted run; reusing it (%s)", backbone, seed, ckpt_dir)
        return finished if is_rank_zero() else {}
    bb = BACKBONES.get(backbone)
    L.seed_everything(seed, workers=True, verbose=False)
    source, source_text = resolve_pretrained(bb, hp.pretrained, hp.weights.get(backbone))
    module, hub_error = create_backbone(backbone, source=source, args=hp.backbone_args)
    if hub_error:
        source_text = f"random init: loading {bb.hub_id} from the hub failed ({hub_error.splitlines()[0][:200]})"
    _logger.info("%s (seed %d): starting weights: %s", backbone, seed, source_text)
    pre = cnn_preprocess(module, hp.image_size, mirror_left=bool(manifest.get("mirrored", pd.Series(False)).any()),
                         tta=hp.tta)
    channels_last = bb.channels_last if hp.channels_last == "auto" else hp.channels_last in ("true", "True", True)
    precision = resolve_precision(hp.precision, hp.accelerator)
    train_ds = KneeDataset(images, train_idx, task_labels(manifest.iloc[train_idx], tasks))
    val_ds = KneeDataset(images, val_idx, task_labels(manifest.iloc[val_idx], tasks))
    train_dl, val_dl = training_loaders(train_ds, val_ds, hp, seed=seed, pre=pre,
                                        hflip=_uses_hflip(hp, manifest), channels_last=channels_last,
                                        rows=input_rows(module, hp.image_size))
    weights = {t: (class_weights(train_ds.labels[t], get_task(t).n_classes) if hp.class_balance == "weighted_loss"
                   else torch.ones(get_task(t).n_classes)) for t in tasks}
    heads = {t: (hp.klg_head if get_task(t).kind == "ordinal" else "ce") for t in tasks}
    net = MultiTaskNet(module, {t: get_task(t).n_classes for t in tasks}, heads)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    lm = _make_module(net, weights, hp, steps_per_epoch=max(1, len(train_dl)))
    monitor, mode = ("val_score", "max") if hp.select_by == "metric" else ("val_loss", "min")
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode=mode, save_top_k=1,
                           enable_version_counter=False, save_last=True)
    resume = find_resume_point(ckpt_dir, key)
    if resume is not None:
        _logger.info("%s (seed %d): resuming from %s after epoch %d of %d", backbone, seed, resume.path,
                     resume.epochs_done, hp.epochs)
    elif is_rank_zero():
        mark_started(ckpt_dir, key)
    trainer = L.Trainer(
        max_epochs=hp.epochs, accelerator=hp.accelerator, devices=hp.devices, strategy=hp.strategy,
        num_nodes=hp.num_nodes, precision=precision, deterministic=False, enable_model_summary=False,
        max_time={"minutes": hp.max_minutes} if hp.max_minutes else None,
        callbacks=[EarlyStopping(monitor=monitor, patience=hp.patience, mode=mode), best],
        logger=CSVLogger(Path(run_dir) / "logs", name=f"{backbone}-{group}-seed{seed}"), log_every_n_steps=10,
        default_root_dir=run_dir)
    t0 = time.time()
    trainer.fit(lm, train_dl, val_dl, ckpt_path=resume.path if resume else None)
    minutes = (time.time() - t0) / 60
    if not trainer.is_global_zero:
        return {}
    mark_finished(ckpt_dir)
    if best.best_model_path:
        lm.load_state_dict(torch.load(best.best_model_path, map_location="cpu", weights_only=False)["state_dict"])
    net = lm.scored.cpu().eval().to(memory_format=torch.contiguous_format)
    score = float(best.best_model_score) if best.best_model_score is not None else None
    extra = {"seed": seed, "epochs_run": int(trainer.current_epoch), "minutes": round(minutes, 2),
             "best_epoch_score": score, "selected_by": monitor, "precision": precision, "channels_last": channels_last,
             "resumed_after_epoch": resume.epochs_done if resume else None}
    payload = make_payload(net, backbone=backbone, backbone_args=hp.backbone_args, preprocess=pre,
                           weights_source=source_text, extra=extra)
    save_finished(ckpt_dir, key, payload)
    return payload


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
        POLICIES.get(hp.augment_policy)
        images = image_cache(run_dir, manifest, hp.image_size)
        task_groups = {"multitask": tasks} if hp.multitask else {t: [t] for t in tasks}
        seeds = [cfg.seed + k for k in range(max(1, hp.ensemble_seeds))]
        members = {g: [train_member(run_dir, manifest, images, backbone, ts, hp, s, g) for s in seeds]
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
                                "ema": hp.ema, "class_balance": hp.class_balance, "image_size": hp.image_size,
                                "backbone_args": hp.backbone_args})
    for backbone in cfg.cnn.backbones:  # every arm is written: a rerun of the stage trains afresh
        clear_finished(Path(run_dir) / CHECKPOINTS_DIR / backbone / "lightning")
