"""Train the supervised CNN arms with Lightning and write their prediction tables.

For every backbone in `cnn.backbones`: build the model (pretrained weights if found, else random init, recorded),
train on the train split with class-weighted cross-entropy (ignoring missing labels), early-stop on the val loss,
keep the best epoch, then predict every split into RUN_DIR/predictions/<backbone>__<task>.parquet.
`accelerator`, `devices`, `strategy` and `num_nodes` go to Lightning unchanged, so multi-GPU, DDP and SLURM runs need
no code change; on CPU the default precision is bf16 autocast where the processor supports it.
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
from torch import nn
from torch.utils.data import DataLoader

from kneeoa.arms import record_arm
from kneeoa.config import CnnCfg, Config, backbone_cfg
from kneeoa.data.dataset import MISSING_LABEL, KneeDataset
from kneeoa.data.manifest import read_manifest
from kneeoa.errors import ConfigError
from kneeoa.metrics import METRICS
from kneeoa.models.cnn import (
    BACKBONES,
    MultiTaskNet,
    checkpoint_path,
    create_backbone,
    norm_stats,
    resolve_pretrained,
    save_checkpoint,
)
from kneeoa.predictions import make_prediction_table, write_predictions
from kneeoa.tasks import available_tasks, get_task

_logger = logging.getLogger(__name__)


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 over the classes present (absent classes get weight 1)."""
    y = labels[labels != MISSING_LABEL]
    counts = np.bincount(y, minlength=n_classes).astype("float64")
    w = np.ones(n_classes)
    present = counts > 0
    w[present] = counts[present].sum() / (present.sum() * counts[present])
    w[present] /= w[present].mean()
    return torch.tensor(w, dtype=torch.float32)


def resolve_precision(precision: str, accelerator: str) -> str:
    """'auto' -> bf16-mixed on bf16-capable CPUs or GPUs, 16-mixed on other GPUs, else 32-true."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


def _collate(batch):
    xs, ys = zip(*batch, strict=True)
    return torch.stack(xs), {t: torch.tensor([y[t] for y in ys]) for t in ys[0]}


class TrainingBudget:
    """Warm-up then cosine decay of the learning rate over the planned steps, or over `max_minutes` if that ends first.

    Progress is the larger of steps done / steps planned and minutes spent / `max_minutes`, so a run stopped by its
    time cap (Lightning's `max_time`) has still annealed its learning rate instead of stopping at its peak.
    """

    def __init__(self, total_steps: int, max_minutes: float | None, warmup: float = 0.15, floor: float = 0.01,
                 clock=time.monotonic) -> None:
        self.total_steps, self.max_seconds = max(1, total_steps), (max_minutes * 60 if max_minutes else None)
        self.warmup, self.floor, self.clock, self.start = warmup, floor, clock, None

    def progress(self, step: int) -> float:
        if self.start is None:
            self.start = self.clock()
        p = step / self.total_steps
        if self.max_seconds:
            p = max(p, (self.clock() - self.start) / self.max_seconds)
        return min(p, 1.0)

    def lr_factor(self, step: int) -> float:
        p = self.progress(step)
        if p < self.warmup:
            return max(self.floor, p / self.warmup)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * (p - self.warmup) / (1 - self.warmup)))


def _make_module(net: MultiTaskNet, weights: dict[str, torch.Tensor], hp: CnnCfg, channels_last: bool,
                 steps_per_epoch: int):
    import lightning as L

    class KneeModule(L.LightningModule):
        """Sum of per-task cross-entropies; AdamW with a cosine schedule over the planned epochs."""

        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.losses = nn.ModuleDict({t: nn.CrossEntropyLoss(weight=w, ignore_index=MISSING_LABEL,
                                                                label_smoothing=hp.label_smoothing)
                                         for t, w in weights.items()})

        def forward(self, x):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.net(x)

        def _loss(self, batch, stage: str):
            x, y = batch
            out = self(x)
            total = 0.0
            for t, loss_fn in self.losses.items():
                if (y[t] != MISSING_LABEL).any():
                    total = total + loss_fn(out[t].float(), y[t])
            self.log(f"{stage}_loss", total, prog_bar=True, on_epoch=True, on_step=False, batch_size=len(x),
                     sync_dist=True)
            return total

        def training_step(self, batch, _):
            return self._loss(batch, "train")

        def validation_step(self, batch, _):
            out = self(batch[0])
            for t, logits in out.items():
                self._val.setdefault(t, []).append((batch[1][t], logits.float().softmax(1)))
            return self._loss(batch, "val")

        def on_validation_epoch_start(self) -> None:
            self._val = {}

        def on_validation_epoch_end(self) -> None:
            # The task's headline metric on val, per epoch, in the log (quadratic kappa for KLG, AUC for binary).
            for t, parts in self._val.items():
                y = torch.cat([p[0] for p in parts]).cpu().numpy()
                probs = torch.cat([p[1] for p in parts]).cpu().numpy()
                keep = y != MISSING_LABEL
                if keep.sum() and len(np.unique(y[keep])) > 1:
                    name = "kappa_quadratic" if get_task(t).kind == "ordinal" else "auc"
                    value = METRICS.get(name).fn(y[keep], probs[keep])
                    self.log(f"val_{t}_{name}", value, prog_bar=t == "klg", sync_dist=True)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
            budget = TrainingBudget(hp.epochs * steps_per_epoch, hp.max_minutes)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, budget.lr_factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return KneeModule()


@torch.no_grad()
def predict_probs(net: MultiTaskNet, loader: DataLoader, *, channels_last: bool, bf16: bool) -> dict[str, np.ndarray]:
    """Softmax probabilities per task for every image of `loader`, in order."""
    net.eval()
    out: dict[str, list[np.ndarray]] = {}
    for x, _ in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(x)
        for t, v in logits.items():
            out.setdefault(t, []).append(torch.softmax(v.float(), dim=1).numpy())
    return {t: np.concatenate(v) for t, v in out.items()}


def train_backbone(run_dir: Path, manifest: pd.DataFrame, backbone: str, tasks: list[str], hp: CnnCfg,
                   seed: int, group: str) -> dict[str, Any]:
    """Train one model (all `tasks` on one backbone) and write its checkpoint and prediction tables."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    bb = BACKBONES.get(backbone)
    L.seed_everything(seed, workers=True, verbose=False)
    source, source_text = resolve_pretrained(bb, hp.pretrained, hp.weights.get(backbone))
    module, hub_error = create_backbone(backbone, source=source)
    if hub_error:
        source_text = f"random init: loading {bb.hub_id} from the hub failed ({hub_error.splitlines()[0][:200]})"
    _logger.info("%s: starting weights: %s", backbone, source_text)
    mean, std = norm_stats(module)
    channels_last = bb.channels_last if hp.channels_last == "auto" else hp.channels_last in ("true", "True", True)
    precision = resolve_precision(hp.precision, hp.accelerator)
    train_rows = manifest[manifest["split"] == "train"]
    if hp.max_train_images and len(train_rows) > hp.max_train_images:
        train_rows = train_rows.sample(hp.max_train_images, random_state=seed)
    val_rows = manifest[manifest["split"] == "val"]
    if train_rows.empty or val_rows.empty:
        raise ConfigError(f"Training {backbone} needs train and val images; the manifest has {len(train_rows)} train "
                          f"and {len(val_rows)} val rows. Check data.split_fractions.")
    common = dict(run_dir=run_dir, tasks=tasks, image_size=hp.image_size, mean=mean, std=std)
    train_ds = KneeDataset(train_rows, augment=hp.augment, progress=True, **common)
    val_ds = KneeDataset(val_rows, **common)
    loader = dict(batch_size=hp.batch_size, num_workers=hp.num_workers, collate_fn=_collate,
                  persistent_workers=hp.num_workers > 0)
    train_dl = DataLoader(train_ds, shuffle=True, drop_last=len(train_ds) > hp.batch_size, **loader)
    val_dl = DataLoader(val_ds, **loader)
    weights = {t: (class_weights(train_ds.labels[t], get_task(t).n_classes) if hp.class_balance == "weighted_loss"
                   else torch.ones(get_task(t).n_classes)) for t in tasks}
    net = MultiTaskNet(module, {t: get_task(t).n_classes for t in tasks})
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    lm = _make_module(net, weights, hp, channels_last, max(1, len(train_dl)))
    ckpt_dir = Path(run_dir) / "checkpoints" / backbone / "lightning" / group
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min", save_top_k=1,
                           enable_version_counter=False)
    trainer = L.Trainer(
        max_epochs=hp.epochs, accelerator=hp.accelerator, devices=hp.devices, strategy=hp.strategy,
        num_nodes=hp.num_nodes, precision=precision, deterministic=False, enable_model_summary=False,
        max_time={"minutes": hp.max_minutes} if hp.max_minutes else None,
        callbacks=[EarlyStopping(monitor="val_loss", patience=hp.patience, mode="min"), best],
        logger=CSVLogger(Path(run_dir) / "logs", name=f"{backbone}-{group}"), log_every_n_steps=10,
        default_root_dir=run_dir)
    t0 = time.time()
    trainer.fit(lm, train_dl, val_dl)
    minutes = (time.time() - t0) / 60
    if not trainer.is_global_zero:
        return {}
    if best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
        lm.load_state_dict(state)
    net = lm.net.cpu().eval()
    preprocess = {"image_size": hp.image_size, "in_chans": 1, "mean": mean, "std": std}
    save_checkpoint(checkpoint_path(run_dir, backbone, group), net, backbone=backbone, preprocess=preprocess,
                    weights_source=source_text, extra={"epochs_run": trainer.current_epoch, "minutes": minutes})
    all_ds = KneeDataset(manifest, **common)
    probs = predict_probs(net, DataLoader(all_ds, batch_size=hp.batch_size, collate_fn=_collate),
                          channels_last=channels_last, bf16=precision.startswith("bf16"))
    for t in tasks:
        has = manifest[t].notna().to_numpy()
        table = make_prediction_table(manifest["image_id"][has], manifest["split"][has],
                                      manifest[t][has].astype(int), probs[t][has])
        write_predictions(table, run_dir, backbone, t)
    return {"epochs_run": int(trainer.current_epoch), "best_val_loss": float(best.best_model_score or np.nan),
            "minutes": round(minutes, 2), "precision": precision, "channels_last": channels_last,
            "weights_source": source_text}


def run(run_dir: Path, cfg: Config) -> None:
    """Train every configured backbone (stage `train`)."""
    manifest = read_manifest(run_dir)
    tasks = available_tasks(manifest, cfg.tasks.names)
    for name in cfg.tasks.names:
        if name not in tasks:
            _logger.warning("task %s has no labels in this dataset; the CNN arms skip it", name)
    for backbone in cfg.cnn.backbones:
        BACKBONES.get(backbone)
        hp = backbone_cfg(cfg.cnn, backbone)
        groups = {"multitask": tasks} if hp.multitask else {t: [t] for t in tasks}
        details = {g: train_backbone(run_dir, manifest, backbone, ts, hp, cfg.seed, g) for g, ts in groups.items()}
        first = next(iter(details.values()), {})
        if first:
            record_arm(run_dir, backbone, status="ran", weights=first["weights_source"], details=details)
