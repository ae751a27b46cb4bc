"""Run a whole study: write the resolved config into the run folder, then run each configured stage in order."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from kneeoa.config import Config, dump_config
from kneeoa.io import write_text
from kneeoa.stages import get_stage

_logger = logging.getLogger(__name__)


def run_study(cfg: Config, run_dir: Path, *, stages: list[str] | None = None) -> dict[str, float]:
    """Run `stages` (default cfg.stages) on `run_dir`; returns seconds per stage."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(dump_config(cfg), run_dir / "config.yaml")
    timings = {}
    for name in stages or cfg.stages:
        fn = get_stage(name)
        t0 = time.time()
        _logger.info("stage %s ...", name)
        fn(run_dir, cfg)
        timings[name] = round(time.time() - t0, 1)
        _logger.info("stage %s done in %.1f s", name, timings[name])
    return timings
