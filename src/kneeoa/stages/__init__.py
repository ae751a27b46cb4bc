"""Stages: functions of a run folder and the config, `run(run_dir: Path, cfg: Config) -> None`.

Each stage reads its inputs from files in the run folder and writes its outputs there (atomically), so any stage can
be re-run or inspected alone. The registry maps a stage name to "module:function" and imports lazily, so the CLI
starts fast and a stage's heavy dependencies load only when it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kneeoa.registry import Registry

STAGES: Registry[str] = Registry("stage")
STAGES.update({
    "prepare": "kneeoa.stages.prepare:run",
    "train": "kneeoa.stages.train:run",
    "embed": "kneeoa.stages.embed:run",
    "boost": "kneeoa.stages.boost:run",
    "zeroshot": "kneeoa.stages.zeroshot:run",
    "evaluate": "kneeoa.stages.evaluate:run",
    "stats": "kneeoa.stages.stats:run",
    "explain": "kneeoa.stages.explain:run",
    "report": "kneeoa.report.html:run",
})


def get_stage(name: str) -> Callable[[Path, object], None]:
    return STAGES.load(name)
