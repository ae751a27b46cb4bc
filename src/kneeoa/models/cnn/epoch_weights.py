"""Every epoch's weights of a training run, kept for studying the training curve offline (`cnn.keep_epoch_weights`).

The run keeps one epoch per network (the best by the selection criterion) and, for resuming, the last. With
`cnn.keep_epoch_weights` it also writes the scored weights of every epoch, after its validation, to
checkpoints/<backbone>/lightning/<member>/epochs/epochNNN.pt: {"epoch", "val_score", "seeds", "state_dicts"} (one
state dict per network of the cohort, in seed order; EMA weights when an EMA is on). `bench/epoch_ensembles.py`
scores checkpoint ensembles and late-epoch averages from these files. About 3.5 MB an epoch for the two-branch
network; hundreds of MB for a ConvNeXt, so it stays off unless asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

EPOCHS_DIR = "epochs"


def epoch_weights_callback(folder: Path, seeds: list[int]):
    """A Lightning callback writing the cohort's scored weights after each epoch's validation into `folder`."""
    from lightning.pytorch.callbacks import Callback

    class EpochWeights(Callback):
        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking or not trainer.is_global_zero:
                return
            score = trainer.callback_metrics.get("val_score")
            Path(folder).mkdir(parents=True, exist_ok=True)
            torch.save({"epoch": int(trainer.current_epoch), "seeds": list(seeds),
                        "val_score": float(score) if score is not None else None,
                        "state_dicts": [{k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
                                        for net in pl_module.scored]},
                       Path(folder) / f"epoch{trainer.current_epoch:03d}.pt")

    return EpochWeights()


def read_epoch_weights(lightning_dir: Path, group: str) -> dict[int, list[dict[str, Any]]]:
    """Seed -> that network's kept epochs, in epoch order: [{"epoch", "val_score", "state_dict"}, ...], from the
    member folders of one task group (`multitask`, or a task's name) under checkpoints/<backbone>/lightning/.

    Raises:
        FileNotFoundError: no epoch weights there (names the folder and the option that writes them).
    """
    files = sorted(Path(lightning_dir).glob(f"{group}-seed*/{EPOCHS_DIR}/epoch*.pt"))
    if not files:
        raise FileNotFoundError(f"No epoch weights of group {group!r} under {lightning_dir}: train with "
                                "cnn.keep_epoch_weights: true to keep every epoch's weights.")
    out: dict[int, list[dict[str, Any]]] = {}
    for f in files:
        blob = torch.load(f, map_location="cpu", weights_only=False)
        for seed, state in zip(blob["seeds"], blob["state_dicts"], strict=True):
            out.setdefault(seed, []).append({"epoch": blob["epoch"], "val_score": blob["val_score"],
                                             "state_dict": state})
    return {seed: sorted(eps, key=lambda e: e["epoch"]) for seed, eps in out.items()}
