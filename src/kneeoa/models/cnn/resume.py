"""Resuming an interrupted CNN training run from its last epoch checkpoint.

Lightning writes `last.ckpt` after every epoch into the member's folder (checkpoints/<backbone>/lightning/
<group>-seed<seed>/, or <group>-seeds<a>-<b>/ for a cohort trained together): weights, EMA weights (a
submodule), optimizer and learning-rate schedule state, epoch and step counters, the early-stopping and
best-checkpoint state, the wall-clock spent (`max_time`) and our schedule's `TrainingBudget` time. `resume.json`
beside it holds a fingerprint of everything that shapes the run (the backbone's settings, tasks, seeds and the
train/val image ids); a rerun with the same fingerprint continues from `last.ckpt`, a rerun with a different one
starts afresh (and says why). A member that finished removes both and leaves its result as `finished.pt` (with the
same fingerprint), so that when a later member of the stage is killed, the rerun takes the finished ones from there
instead of training them again; the stage removes these once all its arms are written, so running a finished stage
again retrains, as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)

LAST = "last.ckpt"
STATE = "resume.json"
FINISHED = "finished.pt"


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to continue from: its path and the number of epochs it completed."""

    path: Path
    epochs_done: int


def fingerprint(hp: Any, **facts: Any) -> str:
    """sha256 of a member's settings (a CnnCfg) and other facts (tasks, seed, image ids), JSON-encoded."""
    blob = json.dumps({"hp": dataclasses.asdict(hp), **facts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def find_resume_point(ckpt_dir: Path, key: str) -> ResumePoint | None:
    """The interrupted run in `ckpt_dir` to continue, if it was started with the same fingerprint `key`.

    A checkpoint from other settings, or one that cannot be read (killed while being written), is removed and None
    returned, with the reason logged.
    """
    ckpt_dir = Path(ckpt_dir)
    last, state = ckpt_dir / LAST, ckpt_dir / STATE
    if not last.exists():
        return None
    try:
        started = json.loads(state.read_text()).get("fingerprint")
    except (OSError, ValueError):
        started = None
    if started != key:
        _logger.warning("%s was written with other settings or data; starting this model afresh", last)
        last.unlink()
        return None
    import torch

    try:
        epoch = int(torch.load(last, map_location="cpu", weights_only=False)["epoch"])
    except Exception as e:  # a truncated or foreign file: torch/pickle raise many types
        _logger.warning("%s cannot be read (%s); starting this model afresh", last, e)
        last.unlink()
        return None
    return ResumePoint(last, epoch + 1)


def mark_started(ckpt_dir: Path, key: str) -> None:
    """Record the fingerprint of the run about to write checkpoints into `ckpt_dir`."""
    from kneeoa.io import write_json

    write_json({"fingerprint": key}, Path(ckpt_dir) / STATE)


def mark_finished(ckpt_dir: Path) -> None:
    """The member finished: its resume state is no longer needed (the best checkpoint stays)."""
    for name in (LAST, STATE):
        (Path(ckpt_dir) / name).unlink(missing_ok=True)


def save_finished(ckpt_dir: Path, key: str, payloads: list[dict[str, Any]]) -> None:
    """Keep a finished member's result (its checkpoint payloads: one network, or a cohort's) until its stage has
    written its arms."""
    import torch

    from kneeoa.io import atomic_path

    with atomic_path(Path(ckpt_dir) / FINISHED) as tmp:
        torch.save({"fingerprint": key, "payloads": payloads}, tmp)


def load_finished(ckpt_dir: Path, key: str) -> list[dict[str, Any]] | None:
    """The payloads of a member an interrupted run finished with the same fingerprint `key`, else None (a result of
    other settings, or of an older format, is removed)."""
    import torch

    path = Path(ckpt_dir) / FINISHED
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: torch/pickle raise many types
        _logger.warning("%s cannot be read (%s); training this model again", path, e)
        saved = {}
    if saved.get("fingerprint") != key or "payloads" not in saved:
        path.unlink(missing_ok=True)
        return None
    return saved["payloads"]


def clear_finished(lightning_dir: Path) -> None:
    """The stage wrote its arms: drop the finished members' results under checkpoints/<backbone>/lightning/."""
    for path in Path(lightning_dir).glob(f"*/{FINISHED}"):
        path.unlink(missing_ok=True)
