"""Fitted fusion models (owner: `fusion`): RUN_DIR/fusion/<arm>/<task>.json.

For `fusion_stack`: the members, the stacker fitted on every val row (coefficients, classes, decoding; the one
applied to test, `kneeoa.models.stacking.Stacker`) and the cross-fitting fold of every val image, so the honest val
figures can be audited and re-derived. For `fusion_features_<head>`: the fitted head, kept as
`kneeoa.runfolder.heads.save_head` keeps the boost arms' heads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kneeoa.io import write_json

FUSION_DIR = "fusion"


def fusion_model_path(run_dir: Path, arm: str, task: str) -> Path:
    return Path(run_dir) / FUSION_DIR / arm / f"{task}.json"


def write_fusion_record(record: dict[str, Any], run_dir: Path, arm: str, task: str) -> Path:
    return write_json(record, fusion_model_path(run_dir, arm, task))


def read_fusion_record(run_dir: Path, arm: str, task: str) -> dict[str, Any] | None:
    path = fusion_model_path(run_dir, arm, task)
    return json.loads(path.read_text()) if path.exists() else None
