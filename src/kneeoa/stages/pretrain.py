"""Stage `pretrain`: a knee encoder learned without labels from the run's own images (`kneeoa pretrain RUN_DIR`).

The images are the manifest's rows of `pretrain.splits` (train only by default: val and test images seen during
pretraining would no longer be unseen at evaluation) plus every image under `pretrain.extra_dirs`; labels are never
read. They are decoded once into the uint8 image cache (`kneeoa.transforms.cache`) at `pretrain.image_size`. The method
(`METHODS`, SimCLR by default, `kneeoa.models.cnn.ssl`) trains the backbone with a projection head on two augmented
views per image; AdamW with a short warm-up and a cosine schedule that anneals within whichever ends first, the epochs
or `pretrain.max_minutes`.

Resumable: RUN_DIR/pretrain/state.pt (weights, optimizer, epoch and step, elapsed seconds, loss history) is written
atomically every `checkpoint_every_s` seconds and at each epoch end; a rerun with the same settings and images
continues from it (and says so), one with other settings starts afresh (and says why). Each step's views and dropout
are drawn from (seed, step), so a resumed run repeats the steps the killed one would have taken; only the schedule's
time term differs when the time cap, not the epochs, sets the pace. The time cap counts the time of every attempt. A
finished run removes the state and writes RUN_DIR/encoders/kneessl/ (`kneeoa.runfolder.encoders`), an encoder folder
(`kneeoa.models.cnn.encoder_folder`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from kneeoa.config import Config, PretrainCfg
from kneeoa.errors import ConfigError, DataError
from kneeoa.io import atomic_path, write_text
from kneeoa.models.cnn.backbones import BACKBONES, create_backbone, norm_stats
from kneeoa.models.cnn.encoder_folder import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, write_encoder
from kneeoa.models.cnn.resume import fingerprint
from kneeoa.models.cnn.ssl import SimCLR, simclr_step
from kneeoa.registry import Registry
from kneeoa.runfolder.encoders import encoder_dir, pretrain_state_path
from kneeoa.runfolder.manifest import read_manifest
from kneeoa.sources.folders import IMAGE_SUFFIXES
from kneeoa.transforms.augment import POLICIES
from kneeoa.transforms.cache import image_cache

_log = logging.getLogger(__name__)

ENCODER_NAME = "kneessl"
WARMUP = 0.03  # share of the budget with a linearly rising learning rate


@dataclasses.dataclass(frozen=True)
class Method:
    """A self-supervised method: its network around the backbone, the loss of one uint8 batch, and its description."""

    build: Callable[[torch.nn.Module], torch.nn.Module]
    step: Callable[..., torch.Tensor]
    title: str


METHODS: Registry[Method] = Registry("pretraining method")
METHODS.add("simclr", Method(SimCLR, simclr_step, "SimCLR (Chen et al. 2020): NT-Xent contrastive loss over two "
                                                  "augmented views, 2-layer projection head"))


def pretrain_images(run_dir: Path, pc: PretrainCfg) -> pd.DataFrame:
    """The rows to pretrain on: manifest rows of `pc.splits`, then every image file under `pc.extra_dirs`.

    Raises:
        ConfigError: an extra folder that does not exist.
        DataError: no image at all.
    """
    manifest = read_manifest(run_dir)
    rows = manifest.loc[manifest["split"].isin(pc.splits), ["image_id", "image_path"]
                        + (["mirrored"] if "mirrored" in manifest else [])]
    extra = []
    for folder in map(Path, pc.extra_dirs):
        if not folder.is_dir():
            raise ConfigError(f"pretrain.extra_dirs: folder {folder} does not exist. Give folders of unlabelled "
                              "knee images (searched recursively) or remove the entry.")
        files = sorted(p.resolve() for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        extra.append(pd.DataFrame({"image_id": [f"extra:{p}" for p in files], "image_path": [str(p) for p in files],
                                   "mirrored": False}))
    out = pd.concat([rows, *extra], ignore_index=True)
    if "mirrored" in out:
        out["mirrored"] = out["mirrored"].fillna(False).astype(bool)
    if len(out) < 2:
        raise DataError(f"Pretraining needs at least 2 images; the manifest of {run_dir} has {len(rows)} in splits "
                        f"{pc.splits} and pretrain.extra_dirs adds {len(out) - len(rows)}. Widen pretrain.splits or "
                        "add pretrain.extra_dirs.")
    return out


def lr_factor(progress: float) -> float:
    """Learning-rate multiplier at a share of the budget: linear warm-up, then cosine to zero."""
    if progress < WARMUP:
        return (progress + 1e-3) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - WARMUP) / (1 - WARMUP))))


def _run_key(pc: PretrainCfg, seed: int, ids: pd.Series) -> str:
    """What makes two attempts the same run: settings that shape training (not the time cap), seed and images."""
    shaping = dataclasses.replace(pc, max_minutes=0.0, checkpoint_every_s=0.0)
    return fingerprint(shaping, seed=seed, images=list(ids))


def _load_state(path: Path, key: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("key") != key:
        _log.warning("%s is from pretraining with other settings or images; starting afresh.", path)
        return None
    return state


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def run(run_dir: Path, cfg: Config, *, minutes: float | None = None, progress: bool = True) -> Path:
    """Pretrain `cfg.pretrain.backbone` on the run's images and write RUN_DIR/encoders/kneessl/.

    Args:
        run_dir: the run folder (its manifest lists the images).
        cfg: the study config (`cfg.pretrain`, `cfg.seed`).
        minutes: time cap overriding `pretrain.max_minutes` (counted over every attempt of this run).
        progress: show a progress bar.

    Returns:
        The encoder folder.
    """
    run_dir, pc = Path(run_dir), cfg.pretrain
    if minutes is not None:
        pc = dataclasses.replace(pc, max_minutes=float(minutes))
    method = METHODS.get(pc.method)
    rows = pretrain_images(run_dir, pc)
    images = image_cache(run_dir, rows, pc.image_size, progress=progress)
    batch = min(pc.batch_size, len(rows))
    steps_per_epoch = len(rows) // batch
    total_steps, budget_s = pc.epochs * steps_per_epoch, pc.max_minutes * 60

    torch.manual_seed(cfg.seed)
    backbone, _ = create_backbone(pc.backbone, source=None, in_chans=1)
    mean, std = norm_stats(backbone)
    model = method.build(backbone)
    if BACKBONES.get(pc.backbone).channels_last:  # 1.4x faster for the two-branch CNN on CPU
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=pc.lr, weight_decay=pc.weight_decay)
    key, state_path = _run_key(pc, cfg.seed, rows["image_id"]), pretrain_state_path(run_dir)
    state = _load_state(state_path, key)
    if state is None:
        state = {"key": key, "step": 0, "elapsed_s": 0.0, "history": [], "attempts": 0,
                 "steps_per_epoch": steps_per_epoch}
    else:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        _log.info("Resuming pretraining from %s: step %d of %d (epoch %d), %.1f of %.1f minutes done.", state_path,
                  state["step"], total_steps, state["step"] // steps_per_epoch, state["elapsed_s"] / 60,
                  pc.max_minutes)
    state["attempts"] += 1
    policy = POLICIES.get("ssl")
    start, spent, saved = time.perf_counter(), state["elapsed_s"], time.perf_counter()

    def elapsed() -> float:
        return spent + time.perf_counter() - start

    def checkpoint() -> None:
        state.update(model=model.state_dict(), optimizer=opt.state_dict(), elapsed_s=elapsed())
        _save_state(state_path, state)

    model.train()
    with tqdm(total=total_steps, initial=state["step"], desc=f"pretrain {pc.backbone} ({pc.method})", unit="step",
              disable=not progress) as bar:
        while state["step"] < total_steps and elapsed() < budget_s:
            step = state["step"]
            epoch, within = divmod(step, steps_per_epoch)
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            idx = np.sort(order[within * batch:(within + 1) * batch].numpy())
            lr = pc.lr * lr_factor(max(step / total_steps, elapsed() / budget_s))
            for group in opt.param_groups:
                group["lr"] = lr
            x = torch.from_numpy(np.asarray(images[idx]))[:, None]
            with torch.random.fork_rng(devices=[]):  # views and dropout drawn from (seed, step): resumable exactly
                torch.manual_seed(cfg.seed * 1_000_003 + step)
                loss = method.step(model, x, policy, mean=mean, std=std, temperature=pc.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            state["step"] = step + 1
            state["history"].append({"epoch": epoch, "step": step, "loss": loss.item(), "lr": lr,
                                     "minutes": elapsed() / 60})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", min=f"{elapsed() / 60:.1f}")
            if state["step"] % steps_per_epoch == 0 or time.perf_counter() - saved >= pc.checkpoint_every_s:
                checkpoint()
                saved = time.perf_counter()
    stopped_by = "epochs" if state["step"] >= total_steps else "time cap"
    checkpoint()
    out = export_encoder(run_dir, backbone, pc, cfg.seed, rows, state, mean=mean, std=std, stopped_by=stopped_by)
    state_path.unlink(missing_ok=True)
    _log.info("Pretrained encoder (%d steps, %.1f min, ended by the %s) -> %s", state["step"],
              state["elapsed_s"] / 60, stopped_by, out)
    return out


def loss_curve(history: list[dict[str, Any]]) -> pd.DataFrame:
    """Per-epoch mean loss, last learning rate and cumulative minutes from the per-step history."""
    steps = pd.DataFrame(history, columns=["epoch", "step", "loss", "lr", "minutes"])
    return steps.groupby("epoch", as_index=False).agg(steps=("step", "size"), loss=("loss", "mean"),
                                                      lr=("lr", "last"), minutes=("minutes", "last"))


def _plot_curve(curve: pd.DataFrame, path: Path) -> None:
    from kneeoa.plotting import new_figure

    fig = new_figure(5, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(curve["epoch"] + 1, curve["loss"], marker="o", markersize=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("NT-Xent loss (mean over the epoch)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def export_encoder(run_dir: Path, backbone: torch.nn.Module, pc: PretrainCfg, seed: int, rows: pd.DataFrame,
                   state: dict[str, Any], *, mean: float, std: float, stopped_by: str) -> Path:
    """Write the encoder folder: loss curve (csv, png), weights (safetensors) and config.json
    (`kneeoa.models.cnn.encoder_folder.write_encoder`), and the model card."""
    folder = encoder_dir(run_dir, ENCODER_NAME)
    folder.mkdir(parents=True, exist_ok=True)
    curve = loss_curve(state["history"])
    with atomic_path(folder / "loss_curve.csv") as tmp:
        curve.to_csv(tmp, index=False)
    _plot_curve(curve, folder / "loss_curve.png")
    n_extra = int(rows["image_id"].str.startswith("extra:").sum())
    minutes = round(state["elapsed_s"] / 60, 2)
    info = {"backbone": pc.backbone, "image_size": pc.image_size, "mean": mean, "std": std,
            "feature_dim": int(backbone.num_features), "in_chans": 1, "method": pc.method,
            "temperature": pc.temperature, "batch_size": min(pc.batch_size, len(rows)), "lr": pc.lr,
            "weight_decay": pc.weight_decay, "augment_policy": "ssl", "seed": seed, "splits": list(pc.splits),
            "extra_dirs": list(pc.extra_dirs), "n_images": len(rows), "n_extra_images": n_extra,
            "steps": state["step"], "epochs": round(state["step"] / state["steps_per_epoch"], 2),
            "minutes": minutes, "max_minutes": pc.max_minutes, "stopped_by": stopped_by,
            "attempts": state["attempts"], "final_loss": float(curve["loss"].iloc[-1]) if len(curve) else None,
            "source_run": str(Path(run_dir).resolve()), "created": datetime.now(UTC).isoformat(timespec="seconds")}
    write_encoder(folder, backbone, info)
    write_text(model_card(info, curve), folder / CARD_FILE)
    return folder


def model_card(info: dict[str, Any], curve: pd.DataFrame) -> str:
    """The encoder folder's README.md: what it was trained on, how, for how long, and how to use it."""
    rows = "\n".join(f"| {int(r.epoch) + 1} | {int(r.steps)} | {r.loss:.4f} | {r.lr:.2e} | {r.minutes:.1f} |"
                     for r in curve.itertuples())
    extra = f"; {info['n_extra_images']} from {', '.join(info['extra_dirs'])}" if info["extra_dirs"] else ""
    final = "n/a (no step)" if info["final_loss"] is None else f"{info['final_loss']:.4f}"
    return f"""# kneessl: {info['backbone']} encoder pretrained without labels on knee radiographs

- Data: {info['n_images']} images of the run {info['source_run']} (manifest splits {', '.join(info['splits'])}{extra});
  no label was read. Val and test images are left out unless `pretrain.splits` names them.
- Method: {METHODS.get(info['method']).title}; temperature {info['temperature']}, batch {info['batch_size']}
  images (two views each), AdamW lr {info['lr']} (warm-up, cosine), weight decay {info['weight_decay']}, seed
  {info['seed']}. Views: kneeoa augmentation policy `ssl` (zoom/crop, rotation up to 10 degrees, shift, gamma,
  contrast, brightness, noise, blur; no colour jitter, no flips).
- Input: {info['image_size']} px grayscale, (x / 255 - {info['mean']}) / {info['std']}; output: {info['feature_dim']}
  features per image (the backbone's pooled features; the projection head is discarded).
- Training: {info['steps']} steps = {info['epochs']} epochs in {info['minutes']} minutes ({info['attempts']}
  attempt(s); ended by the {info['stopped_by']}, cap {info['max_minutes']} min). Final loss {final}.
- Files: `{WEIGHTS_FILE}` (backbone state dict), `{CONFIG_FILE}`, `loss_curve.csv`, `loss_curve.png`.

## Use

- Frozen features: `kneeoa embed RUN_DIR --encoder kneessl [--weights THIS_FOLDER]`, then
  `kneeoa boost RUN_DIR --encoder kneessl` (arms `kneessl_xgb`, `kneessl_linear`).
- Starting weights of a CNN arm: `cnn.pretrained: THIS_FOLDER` with `cnn.backbones: [{info['backbone']}]`.

## Loss curve

![loss curve](loss_curve.png)

| epoch | steps | loss | lr | minutes |
|---|---|---|---|---|
{rows}
"""
