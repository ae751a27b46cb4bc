"""One writer per run folder: a live holder refuses a second process, a dead holder's lock and temp files go."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kneeoa.cli.app import app
from kneeoa.runlock import LOCK_NAME, RunFolderBusyError, global_rank, run_lock

runner = CliRunner()


def _hold(run_dir, pid: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": "kneeoa train",
                                                 "since": "2026-01-01 00:00:00"}))


def test_live_holder_refuses_a_second_writer(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _hold(tmp_path / "run", holder.pid)
        with pytest.raises(RunFolderBusyError, match=rf"is in use by process {holder.pid} .*kneeoa train"):
            with run_lock(tmp_path / "run"):
                pass
        res = runner.invoke(app, ["phantom", "--out", str(tmp_path / "run"), "--patients", "1"])
        assert res.exit_code == 2 and f"in use by process {holder.pid}" in res.output
        assert not (tmp_path / "run" / "manifest.parquet").exists()
    finally:
        holder.kill()
        holder.wait()


def test_dead_holders_lock_and_temporaries_are_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    _hold(run, dead.pid)
    (run / "predictions").mkdir()
    leftover = run / "predictions" / ".a__klg.parquet.x1y2.tmp"
    leftover.write_text("half a table")
    with run_lock(run, "test"):
        assert json.loads((run / LOCK_NAME).read_text())["command"] == "test"
        assert not leftover.exists()
        with run_lock(run, "nested"):  # re-entrant in one process
            pass
        assert (run / LOCK_NAME).exists()
    assert not (run / LOCK_NAME).exists()


def test_only_rank_zero_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert global_rank() == 1
    with run_lock(tmp_path / "run"):
        assert not (tmp_path / "run" / LOCK_NAME).exists()
