"""Run a whole study: check the whole config, write it into the run folder, then run each configured stage in order.

The config is validated before the first stage (`kneeoa.config_checks`), so a typo fails in seconds, not after
training. The run folder is locked for the whole study (`kneeoa.runlock`). In a distributed launch every process
runs this same function: rank 0 runs every stage and writes every file; the other ranks run only the stages that
train across processes (`DISTRIBUTED_STAGES`) and write nothing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from kneeoa.config import Config, dump_config
from kneeoa.config_checks import validate_config
from kneeoa.io import write_text
from kneeoa.runlock import global_rank, is_rank_zero, run_lock
from kneeoa.stages import check_plan, get_stage

_logger = logging.getLogger(__name__)

DISTRIBUTED_STAGES = ("train",)  # stages whose work is shared by every rank of a distributed launch


def run_study(cfg: Config, run_dir: Path, *, stages: list[str] | None = None) -> dict[str, float]:
    """Run `stages` (default cfg.stages) on `run_dir`; returns seconds per stage.

    Raises:
        ConfigError: the config (or a name in `stages`) is invalid; nothing has run or been written.
        RunFolderBusyError: another process is writing into `run_dir`.
    """
    run_dir = Path(run_dir)
    names = list(stages or cfg.stages)
    validate_config(cfg)
    fns = {name: get_stage(name) for name in names}  # unknown names fail here, before any stage runs
    check_plan(names, run_dir)  # every stage's inputs exist or come from an earlier stage; nothing written yet
    if not is_rank_zero():
        _logger.info("rank %d: joining %s only; rank 0 runs the other stages", global_rank(),
                     ", ".join(n for n in names if n in DISTRIBUTED_STAGES) or "nothing")
        names = [n for n in names if n in DISTRIBUTED_STAGES]
    timings = {}
    with run_lock(run_dir, f"study {cfg.name}: {', '.join(names)}"):
        if is_rank_zero():
            write_text(dump_config(cfg), run_dir / "config.yaml")
        for name in names:
            t0 = time.time()
            _logger.info("stage %s ...", name)
            fns[name](run_dir, cfg)
            timings[name] = round(time.time() - t0, 1)
            _logger.info("stage %s done in %.1f s", name, timings[name])
    return timings
