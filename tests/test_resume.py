"""Kill -9 during CNN training, rerun the same command: it resumes from the last epoch checkpoint and completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import make_tiny_run
from kneeoa.config import Config, dump_config
from kneeoa.models.cnn.resume import LAST, STATE, find_resume_point, fingerprint, mark_started
from kneeoa.runfolder.arms import read_arms

EPOCHS = 10
KILL_AFTER = 2  # epochs completed when the first run is killed


def _config(mutual: float = 0.0) -> Config:
    cfg = Config()
    cfg.tasks.names = ["klg"]
    cfg.cnn.backbones = ["resnet18"]
    cfg.cnn.image_size, cfg.cnn.epochs, cfg.cnn.batch_size, cfg.cnn.patience = 64, EPOCHS, 8, 100
    cfg.cnn.pretrained, cfg.cnn.precision, cfg.cnn.ema = "none", "32-true", 0.9
    if mutual:  # two seeds that train together: one folder, one checkpoint for both
        cfg.cnn.ensemble_seeds, cfg.cnn.mutual = 2, mutual
    return cfg


def _train(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "250"}
    return subprocess.Popen([sys.executable, "-c", "from kneeoa.cli.app import app; app()", "train", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _epochs_done(last: Path) -> int | None:
    try:
        return int(torch.load(last, map_location="cpu", weights_only=False, mmap=True)["epoch"]) + 1
    except Exception:  # absent, or being written right now
        return None


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize(("mutual", "folder"), [(0.0, "multitask-seed0"), (1.0, "multitask-seeds0-1")])
def test_killed_training_resumes_from_its_last_epoch(tmp_path, mutual, folder):
    run = tmp_path / "run"
    make_tiny_run(run, patients=24, size=64)
    (run / "config.yaml").write_text(dump_config(_config(mutual)))
    member = run / "checkpoints" / "resnet18" / "lightning" / folder

    first = _train(run)
    deadline = time.monotonic() + 1500  # a loaded machine may take minutes to start the run
    while (_epochs_done(member / LAST) or 0) < KILL_AFTER:
        assert first.poll() is None, f"training ended before it could be killed:\n{first.stdout.read()}"
        assert time.monotonic() < deadline, "no epoch checkpoint appeared"
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = _epochs_done(member / LAST)  # the checkpoint as the kill left it (a later epoch may have landed)
    assert first.returncode == -signal.SIGKILL and KILL_AFTER <= killed_at < EPOCHS
    assert not (run / "arms" / "resnet18.json").exists()

    second = _train(run)
    out, _ = second.communicate(timeout=1500)
    assert second.returncode == 0, out
    said = f"resuming from {member / LAST} after epoch {killed_at} of {EPOCHS}"
    assert "".join(said.split()) in "".join(out.split())  # the log wraps long lines
    extra = read_arms(run)["resnet18"]["details"]["members"]["multitask"][0]
    assert extra["resumed_after_epoch"] == killed_at and extra["epochs_run"] == EPOCHS
    logged = sorted(run.glob(f"logs/resnet18-{folder}/version_*/metrics.csv"))
    assert len(logged) == 2  # the killed run's log and the resumed run's
    resumed_epochs = sorted(pd.read_csv(logged[1])["epoch"].dropna().astype(int).unique())
    assert resumed_epochs == list(range(killed_at, EPOCHS))  # no epoch trained twice, none skipped
    assert not (member / LAST).exists() and not (member / STATE).exists()  # finished: nothing left to resume
    assert not list(run.rglob(".*.tmp"))
    print(f"timeline: killed (SIGKILL) after epoch {killed_at} of {EPOCHS}; rerun resumed after epoch "
          f"{extra['resumed_after_epoch']}, trained epochs {resumed_epochs[0] + 1}-{resumed_epochs[-1] + 1}, "
          f"finished with {extra['epochs_run']} epochs")


def test_checkpoint_from_other_settings_is_not_resumed(tmp_path):
    cfg = _config().cnn
    key = fingerprint(cfg, seed=0)
    mark_started(tmp_path, key)
    torch.save({"epoch": 3}, tmp_path / LAST)
    assert find_resume_point(tmp_path, key).epochs_done == 4
    cfg.lr = 0.5
    assert find_resume_point(tmp_path, fingerprint(cfg, seed=0)) is None
    assert not (tmp_path / LAST).exists()  # removed, so it cannot be resumed by mistake later


def test_unreadable_checkpoint_starts_afresh(tmp_path):
    key = fingerprint(_config().cnn)
    mark_started(tmp_path, key)
    (tmp_path / LAST).write_bytes(b"\x80\x02truncated")
    assert find_resume_point(tmp_path, key) is None
    assert json.loads((tmp_path / STATE).read_text())["fingerprint"] == key


def test_schedule_time_spent_before_a_kill_counts_after_resume():
    from kneeoa.models.cnn.training import TrainingBudget

    now = [0.0]
    fresh = TrainingBudget(1000, max_minutes=1.0, clock=lambda: now[0])
    resumed = TrainingBudget(1000, max_minutes=1.0, clock=lambda: now[0], spent_s=45.0)
    assert fresh.progress(0) == 0.0 and resumed.progress(0) == 0.75
    now[0] = 15.0
    assert resumed.elapsed() == 60.0 and resumed.progress(1) == 1.0  # the cap is reached on time, not 45 s late


def test_ensemble_members_finished_before_a_kill_are_reused_not_trained_again(tiny_run, monkeypatch):
    import lightning as L

    from kneeoa.stages import train

    cfg = Config()
    cfg.tasks.names, cfg.cnn.backbones = ["klg"], ["twobranch"]
    cfg.cnn.image_size, cfg.cnn.epochs, cfg.cnn.batch_size, cfg.cnn.pretrained = 32, 1, 8, "none"
    cfg.cnn.ensemble_seeds = 2
    real_fit, fits = L.Trainer.fit, []

    class Killed(BaseException):
        """Stands for kill -9 while the second seed trains."""

    def fit_killed_on_the_second_member(self, *args, **kwargs):
        fits.append(kwargs.get("ckpt_path"))
        if len(fits) == 2:
            raise Killed
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", fit_killed_on_the_second_member)
    with pytest.raises(Killed):
        train.run(tiny_run, cfg)
    lightning = tiny_run / "checkpoints" / "twobranch" / "lightning"
    assert [p.parent.name for p in lightning.glob("*/finished.pt")] == ["multitask-seed0"]

    fits.clear()
    monkeypatch.setattr(L.Trainer, "fit", lambda self, *a, **k: fits.append(1) or real_fit(self, *a, **k))
    train.run(tiny_run, cfg)
    assert len(fits) == 1  # only the seed that was killed trains; seed 0 comes from its finished result
    assert {"twobranch", "twobranch_ens"} <= set(read_arms(tiny_run))
    assert not list(lightning.glob("*/finished.pt"))  # the stage completed: nothing left to reuse
    train.run(tiny_run, cfg)  # a completed stage run again trains again, as before
    assert len(fits) == 3


def test_the_resume_checkpoint_is_the_last_epoch_even_when_an_earlier_one_scored_best(tiny_run, monkeypatch):
    """An interrupted run resumes from its last finished epoch, not from the epoch kept as best (which Lightning's
    `save_last` alone would leave as `last.ckpt`): here every epoch scores worse than the first."""
    from kneeoa.models.cnn import training
    from kneeoa.stages import train

    scores = iter(range(100, 0, -1))
    monkeypatch.setattr(training, "val_score", lambda *args: float(next(scores)))
    monkeypatch.setattr(train, "mark_finished", lambda ckpt_dir: None)  # keep what an interruption would leave
    cfg = Config()
    cfg.tasks.names = ["klg"]
    cfg.cnn.backbones, cfg.cnn.image_size, cfg.cnn.epochs, cfg.cnn.batch_size = ["twobranch"], 32, 3, 8
    cfg.cnn.pretrained, cfg.cnn.patience = "none", 100
    train.run(tiny_run, cfg)
    member = tiny_run / "checkpoints" / "twobranch" / "lightning" / "multitask-seed0"
    assert torch.load(member / "best.ckpt", map_location="cpu", weights_only=False)["epoch"] == 0
    assert _epochs_done(member / LAST) == 3
    assert json.loads((member / STATE).read_text())["fingerprint"]  # what a rerun checks before resuming
