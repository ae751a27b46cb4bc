"""Occlusion-map figures (owner: `explain`): RUN_DIR/figures/occlusion/<arm>__<task>.png montages and index.json,
laid out like the Grad-CAM folder (`kneeoa.runfolder.gradcam`): the montages (`{"arm", "task", "file"}`), the random
maps' smoothing per arm x task (`sigma_px`), the patch, stride and fill used (`settings`) and the arms that could not
be explained, with why (`{"arm", "task", "reason"}`: arms whose model cannot be re-run on new crops)."""

from __future__ import annotations

from pathlib import Path

from kneeoa.runfolder.montages import MontageFolder

OCCLUSION = MontageFolder(Path("figures") / "occlusion")
