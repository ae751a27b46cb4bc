"""Fitted embedding heads (owner: `boost`): RUN_DIR/heads/<arm>/<task>.json, one XGBoost model file per arm x task
(`kneeoa.estimators.XGBHead.save`), kept for `kneeoa export`."""

from __future__ import annotations

from pathlib import Path

HEADS_DIR = "heads"


def head_path(run_dir: Path, arm: str, task: str) -> Path:
    return Path(run_dir) / HEADS_DIR / arm / f"{task}.json"
