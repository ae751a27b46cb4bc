"""Who may write a run folder: one process at a time (a lock file holding its pid), and only rank 0 of a launch.

`run_lock(run_dir, command)` creates RUN_DIR/.kneeoa.lock exclusively and removes it on exit. A second writer gets
`RunFolderBusyError` naming the holder's pid and command; a lock left by a process that no longer runs (kill -9) is
taken over, with a warning. Taking the lock also deletes the temporary files (`.<name>.<random>.tmp`, see
`kneeoa.io.atomic_path`) that a killed writer left, so no partial file outlives the next run. The lock is
re-entrant within one process (a study holding it runs stages that take it again).

In a distributed launch (Lightning's launcher, torchrun, SLURM) every process runs the same command; only the
process of global rank 0 writes files and holds the lock, the others join training and nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kneeoa.errors import KneeoaError
from kneeoa.io import output_dir

_logger = logging.getLogger(__name__)

LOCK_NAME = ".kneeoa.lock"
TMP_GLOB = ".*.tmp"
_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # global ranks, as Lightning reads them
_held: dict[Path, int] = {}  # lock path -> nesting depth, in this process


class RunFolderBusyError(KneeoaError, RuntimeError):
    """Another live process is writing into the run folder."""


def global_rank() -> int:
    """This process's rank in a distributed launch: 0 for the one process that writes (and when not launched).

    torchrun sets RANK, SLURM's srun SLURM_PROCID; Lightning's own launcher sets LOCAL_RANK and NODE_RANK only.
    """
    for key in _RANK_VARIABLES:
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    local, node = (int(os.environ.get(k, "0") or 0) for k in ("LOCAL_RANK", "NODE_RANK"))
    return node * int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) + local


def is_rank_zero() -> bool:
    return global_rank() == 0


def _alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine's process cannot be checked from here: assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # half-written by a writer killed at that instant: treated as stale


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files killed writers left under `run_dir` (returns them); only under the lock."""
    stale = [p for p in Path(run_dir).rglob(TMP_GLOB) if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        _logger.info("removed %d temporary file(s) left by an interrupted run in %s", len(stale), run_dir)
    return stale


def _acquire(path: Path, command: str) -> None:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": time.strftime("%F %T")}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            pid, host = holder.get("pid"), holder.get("host", socket.gethostname())
            if isinstance(pid, int) and pid != os.getpid() and _alive(pid, host):
                raise RunFolderBusyError(
                    f"{path.parent} is in use by process {pid} on {host} ({holder.get('command', '?')}, since "
                    f"{holder.get('since', '?')}). Wait for it to finish or write to another folder; if that process "
                    f"is gone, delete {path}.") from None
            _logger.warning("taking over the lock of %s left by process %s, which no longer runs", path.parent, pid)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return


@contextmanager
def run_lock(run_dir: Path, command: str | None = None) -> Iterator[None]:
    """Hold RUN_DIR's write lock for the block (no-op on ranks other than 0, which write nothing).

    Raises:
        RunFolderBusyError: another live process holds it.
    """
    if not is_rank_zero():
        yield
        return
    run_dir = Path(run_dir)
    output_dir(run_dir)
    path = (run_dir / LOCK_NAME).resolve()
    if path not in _held:
        _acquire(path, command or " ".join(sys.argv))
        remove_stale_temporaries(run_dir)
    _held[path] = _held.get(path, 0) + 1
    try:
        yield
    finally:
        _held[path] -= 1
        if not _held[path]:
            del _held[path]
            path.unlink(missing_ok=True)
