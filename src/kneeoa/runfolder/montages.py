"""Figure folders of the explain stage (owner: `explain`): one montage PNG per arm x task and an index.json, under
RUN_DIR/figures/.

`MontageFolder` names the files and writes and reads them. Its two folders:
- `GRADCAM`, RUN_DIR/figures/gradcam/: the index lists the montages (`{"arm", "task", "file"}`, file relative to the
  run folder), the random maps' smoothing per arm x task (`sigma_px`), the hooked layer (`settings`) and anything
  skipped, with why (`{"arm", "task", "reason"}`);
- `OCCLUSION`, RUN_DIR/figures/occlusion/: laid out alike, with the patch, stride and fill used (`settings`) and the
  arms that could not be explained, with why (arms whose model cannot be re-run on new crops).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kneeoa.io import atomic_path, write_json

INDEX = "index.json"


@dataclass(frozen=True)
class MontageFolder:
    """RUN_DIR/<folder>/<arm>__<task>.png montages and RUN_DIR/<folder>/index.json."""

    folder: Path

    def montage_file(self, arm: str, task: str) -> Path:
        """The montage's path relative to the run folder (as the index records it)."""
        return self.folder / f"{arm}__{task}.png"

    def write_montage(self, fig, run_dir: Path, arm: str, task: str) -> Path:
        """Save a matplotlib figure as the arm x task montage, atomically; returns the path relative to the run
        folder."""
        rel = self.montage_file(arm, task)
        with atomic_path(Path(run_dir) / rel) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        return rel

    def write_index(self, index: dict[str, Any], run_dir: Path) -> Path:
        return write_json(index, Path(run_dir) / self.folder / INDEX)

    def read_index(self, run_dir: Path) -> dict[str, Any] | None:
        path = Path(run_dir) / self.folder / INDEX
        return json.loads(path.read_text()) if path.exists() else None

    def remove(self, run_dir: Path) -> bool:
        """Delete the folder (figures of an earlier run that this run does not make); whether there was one."""
        path = Path(run_dir) / self.folder
        if not path.exists():
            return False
        shutil.rmtree(path)
        return True


GRADCAM = MontageFolder(Path("figures") / "gradcam")
OCCLUSION = MontageFolder(Path("figures") / "occlusion")
