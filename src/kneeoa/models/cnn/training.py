"""What training a CNN does at each step: the Lightning module, its learning-rate budget and its val score.

The module trains a *cohort*: one network, or with `cnn.together` all of an ensemble's seeds side by side on the
same batches, learning from each other with `cnn.mutual` (deep mutual learning, `kneeoa.models.cnn.mutual`).
Validation scores the cohort's averaged probabilities, as the ensemble arm will predict, so the epoch kept is the one
where the cohort grades best. With one network every number is what it would be without the cohort wrapper.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from kneeoa.config import CnnCfg
from kneeoa.models.cnn.backbones import MultiTaskNet
from kneeoa.models.cnn.heads import HEADS, decode, tune_cutpoints
from kneeoa.models.cnn.mixup import mix_batch
from kneeoa.models.cnn.mutual import mutual_loss
from kneeoa.stats.metrics import METRICS
from kneeoa.tasks import get_task
from kneeoa.transforms.dataset import MISSING_LABEL

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


def cohort_minutes(hp: CnnCfg, n_nets: int) -> float | None:
    """The time cap of a loop that trains `n_nets` networks: `cnn.max_minutes` is per network (None: no cap)."""
    return hp.max_minutes * n_nets if hp.max_minutes else None


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


def make_module(nets: list[MultiTaskNet], weights: dict[str, torch.Tensor], hp: CnnCfg, *, steps_per_epoch: int):
    """The Lightning module that trains `nets` (one network, or a cohort on shared batches) with these class weights
    and settings."""
    import lightning as L

    class KneeModule(L.LightningModule):
        """Sum over the cohort of the tasks' head losses (blended over mixup pairs with `cnn.mixup`), plus
        `cnn.mutual` x the mutual-learning term when the cohort has several networks; AdamW, warm-up + cosine over
        the planned steps or the time cap. Batches arrive augmented and normalised (`training_loaders`); the mean
        training loss per network is logged once per epoch."""

        def __init__(self) -> None:
            super().__init__()
            self.nets = nn.ModuleList(nets)
            self.class_weights = weights
            self.ema = None
            self._loss_sum, self._loss_n = 0.0, 0  # this epoch's training loss summed over images, and the images
            if hp.ema:
                from timm.utils import ModelEmaV3

                self.ema = ModelEmaV3(self.nets, decay=hp.ema)

        @property
        def scored(self) -> nn.ModuleList:
            """The weights validation and the checkpoint use: the EMA when on."""
            return self.ema.module if self.ema is not None else self.nets

        def _loss(self, out, y) -> torch.Tensor:
            total = 0.0
            for t, w in self.class_weights.items():
                if (y[t] != MISSING_LABEL).any():
                    head = HEADS.get(self.nets[0].head_names[t])
                    total = total + head.loss(out[t].float(), y[t], w, hp.label_smoothing)
            return total

        def training_step(self, batch, _):
            x, mates, lam = mix_batch(*batch, hp.mixup)  # mates None, lam 1 without mixup
            outs = [net(x) for net in self.nets]
            losses = [lam * self._loss(o, batch[1]) + (self._loss(o, mates) * (1 - lam) if mates else 0.0)
                      for o in outs]
            loss = sum(losses[1:], losses[0])
            if hp.mutual and len(outs) > 1:
                loss = loss + hp.mutual * mutual_loss(
                    [net.probs({t: v.float() for t, v in o.items()}) for net, o in zip(self.nets, outs, strict=True)])
            n = len(batch[0])
            self._loss_sum, self._loss_n = self._loss_sum + loss.detach() / len(outs) * n, self._loss_n + n
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
                self.ema.update(self.nets)

        def on_validation_epoch_start(self) -> None:
            self._val: dict[str, list] = {}

        def validation_step(self, batch, _):
            x, y = batch
            outs = [net(x) for net in self.scored]
            self.log("val_loss", sum(self._loss(o, y) for o in outs) / len(outs), prog_bar=True, on_epoch=True,
                     on_step=False, batch_size=len(x), sync_dist=True)
            probs = [net.probs(o) for net, o in zip(self.scored, outs, strict=True)]
            for t in probs[0]:
                self._val.setdefault(t, []).append((y[t], sum(p[t].float() for p in probs) / len(probs)))

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
            opt = torch.optim.AdamW(self.nets.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
            self.budget = TrainingBudget(hp.epochs * steps_per_epoch, cohort_minutes(hp, len(self.nets)),
                                         spent_s=getattr(self, "budget_spent_s", 0.0))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, self.budget.lr_factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def on_save_checkpoint(self, checkpoint: dict) -> None:
            checkpoint[BUDGET_KEY] = self.budget.elapsed()  # the schedule's clock, for a resumed run

        def on_load_checkpoint(self, checkpoint: dict) -> None:
            self.budget_spent_s = float(checkpoint.get(BUDGET_KEY, 0.0))  # runs before configure_optimizers

    return KneeModule()


