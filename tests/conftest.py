"""Shared fixtures: tiny run folders built in tmp_path; the hub is never reached."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from kneeoa.config import Config  # noqa: E402
from kneeoa.formats.images import save_gray16  # noqa: E402

pytest_plugins = ["plugin_package"]  # fixture `outside_plugins`: an outside package's kneeoa entries


def make_tiny_run(run_dir: Path, *, patients: int = 12, size: int = 32, seed: int = 0) -> pd.DataFrame:
    """A run folder with random 16-bit crops whose brightness follows the KL grade, and a valid manifest.

    Both knees of each patient, one visit; splits by patient (8/2/2 of 12); raw OARSI grades drawn consistent
    with KL so every task has both classes.
    """
    from kneeoa.sources.manifest import write_manifest
    from kneeoa.sources.splits import assign_splits
    from kneeoa.tasks import RAW_GRADE_COLUMNS, add_task_labels

    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        for side in ("R", "L"):
            klg = int(rng.integers(0, 5))
            img = np.clip(rng.normal(0.2 + 0.15 * klg, 0.05, (size, size)), 0, 1)
            image_id = f"P{p:03d}_{side}_V00"
            save_gray16(img, run_dir / "crops" / f"{image_id}.png")
            grades = {c: int(min(3, max(0, klg - 1 + rng.integers(-1, 2)))) for c in RAW_GRADE_COLUMNS}
            rows.append({"image_id": image_id, "patient_id": f"P{p:03d}", "visit": 0, "side": side,
                         "image_path": f"crops/{image_id}.png", "low_quality": False, "source": "test",
                         "klg": klg, **grades})
    df = pd.DataFrame(rows)
    df["split"] = assign_splits(df, fractions=(0.67, 0.165, 0.165), seed=seed)
    df = add_task_labels(df)
    write_manifest(df, run_dir)
    return df


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    make_tiny_run(run_dir)
    return run_dir


@pytest.fixture(scope="session")
def standin_snapshots(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight BiomedCLIP and RAD-DINO snapshots in the hub layouts and a knee encoder folder, built once
    per session."""
    from standins import build_biomedclip, build_kneessl, build_raddino

    root = tmp_path_factory.mktemp("weights")
    kneessl = build_kneessl(root / "kneessl")  # `random` takes the architecture of an encoder folder
    return {"biomedclip": build_biomedclip(root / "biomedclip"), "rad-dino": build_raddino(root / "rad-dino"),
            "kneessl": kneessl, "random": kneessl}


def contract_config(weights: dict[str, Path]) -> Config:
    """A whole study at toy size: every stage, the stand-in encoders, and fusion of the CNN with an embedding arm."""
    cfg = Config(name="contract")
    cfg.data.patients, cfg.data.visits, cfg.data.image_size = 16, 1, 64
    cfg.cnn.backbones, cfg.cnn.epochs, cfg.cnn.image_size = ["resnet18"], 1, 32
    cfg.cnn.pretrained, cfg.cnn.batch_size = "none", 8
    cfg.foundation.weights = {k: str(v) for k, v in weights.items()}
    cfg.foundation.precision, cfg.foundation.batch_size, cfg.foundation.linear_probe = "fp32", 8, False
    cfg.foundation.xgb_grid, cfg.foundation.xgb_n_estimators = {"max_depth": [2]}, 20
    cfg.stats.n_boot = 20
    cfg.explain.per_grade, cfg.explain.max_score_images = 1, 4
    cfg.explain.occlusion_patch, cfg.explain.occlusion_stride, cfg.explain.occlusion_images = 0.5, 0.5, 2  # fast
    cfg.pretrain.image_size, cfg.pretrain.epochs, cfg.pretrain.batch_size = 32, 2, 8
    cfg.stages.insert(cfg.stages.index("boost") + 1, "fusion")
    cfg.fusion.arms, cfg.fusion.folds = ["resnet18", "raddino_xgb"], 2
    return cfg


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, standin_snapshots):
    """A finished toy study (`contract_config`): (run folder, config), built once per session."""
    from kneeoa.study import run_study

    run = tmp_path_factory.mktemp("contract") / "run"
    cfg = contract_config(standin_snapshots)
    run_study(cfg, run)
    return run, cfg
