"""Grad-CAM figures (owner: `explain`): RUN_DIR/figures/gradcam/<arm>__<task>.png montages and index.json, which
lists the montages (`{"arm", "task", "file"}`, file relative to the run folder), the random maps' smoothing per
arm x task (`sigma_px`), the hooked layer (`settings`) and anything skipped, with why (`{"arm", "task", "reason"}`)."""

from __future__ import annotations

from pathlib import Path

from kneeoa.runfolder.montages import MontageFolder

GRADCAM = MontageFolder(Path("figures") / "gradcam")
