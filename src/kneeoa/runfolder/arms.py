"""Arm records: for every arm, whether it ran, from which weights, or why not.

RUN_DIR/arms/<arm>.json holds {"arm", "status": "ran" | "not_run", "reason", "weights", "details"}. The report
shows an arm that did not run with its reason instead of numbers: an arm without weights never reports results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kneeoa.io import write_json

ARMS_DIR = "arms"


def record_arm(run_dir: Path, arm: str, *, status: str, reason: str = "", weights: str = "",
               details: dict[str, Any] | None = None) -> Path:
    if status not in ("ran", "not_run"):
        raise ValueError(f"arm status must be 'ran' or 'not_run'. Got {status!r}.")
    rec = {"arm": arm, "status": status, "reason": reason, "weights": weights, "details": details or {}}
    return write_json(rec, Path(run_dir) / ARMS_DIR / f"{arm}.json")


def read_arms(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every arm record of the run, by arm name."""
    out = {}
    for p in sorted((Path(run_dir) / ARMS_DIR).glob("*.json")):
        rec = json.loads(p.read_text())
        out[rec["arm"]] = rec
    return out
