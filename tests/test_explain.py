"""The explain stage on a tiny run folder: a stand-in ResNet18 checkpoint, phantom-style crops and masks."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from kneeoa.config import Config
from kneeoa.errors import DataError
from kneeoa.formats.images import save_gray16
from kneeoa.runfolder.checkpoints import checkpoint_path
from kneeoa.runfolder.metrics import COLUMNS, read_metrics_part
from kneeoa.runfolder.predictions import make_prediction_table, write_predictions
from kneeoa.sources.manifest import write_manifest
from kneeoa.stages import get_stage

SIZE = 48


def make_cam_run(run_dir, *, n_patients=6):
    from kneeoa.models.cnn.backbones import MultiTaskNet, save_checkpoint
    from kneeoa.transforms.preprocess import Preprocess

    rng = np.random.default_rng(0)
    rows = []
    (run_dir / "masks").mkdir(parents=True)
    for i in range(2 * n_patients):
        image_id = f"P{i // 2:02d}_{'RL'[i % 2]}"
        img = rng.random((SIZE, SIZE)) * 0.3
        masks = {k: np.zeros((SIZE, SIZE), bool) for k in ("osteophytes", "jsn", "sclerosis", "joint")}
        masks["joint"][10:38, 5:43] = True
        if i % 3:  # two images in three have the feature
            masks["osteophytes"][20:28, 5:12] = True
            img[masks["osteophytes"]] = 0.9
        save_gray16(img, run_dir / "crops" / f"{image_id}.png")
        np.savez_compressed(run_dir / "masks" / f"{image_id}.npz", **masks)
        rows.append({"image_id": image_id, "patient_id": f"P{i // 2:02d}", "visit": 0, "side": "RL"[i % 2],
                     "image_path": f"crops/{image_id}.png", "split": "test", "low_quality": False,
                     "source": "phantom", "mask_path": f"masks/{image_id}.npz", "klg": int(i % 5),
                     "osteophytes": int(bool(i % 3))})
    manifest = pd.DataFrame(rows)
    write_manifest(manifest, run_dir)
    torch.manual_seed(0)
    net = MultiTaskNet(timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=0),
                       {"osteophytes": 2, "klg": 5})
    save_checkpoint(checkpoint_path(run_dir, "resnet18", "multitask"), net, backbone="resnet18",
                    preprocess=Preprocess.for_cnn(SIZE, 0.5, 0.25, in_chans=1), weights_source="none")
    for task, k in (("osteophytes", 2), ("klg", 5)):
        y = manifest[task].to_numpy()
        probs = rng.dirichlet(np.ones(k), len(y))
        write_predictions(make_prediction_table(manifest["image_id"], manifest["split"], y, probs), run_dir,
                          "resnet18", task)
    get_stage("evaluate")(run_dir, Config())
    return manifest


def _cfg():
    cfg = Config()
    cfg.tasks.names = ["klg", "osteophytes"]
    cfg.stats.n_boot = 50
    cfg.explain.per_grade = 1
    cfg.explain.occlusion_images = 3
    cfg.explain.occlusion_patch, cfg.explain.occlusion_stride = 0.5, 0.25  # 3 x 3 positions: fast
    return cfg


def test_explain_writes_montages_and_cam_rows(tmp_path):
    from kneeoa.stages import explain

    make_cam_run(tmp_path)
    explain.run(tmp_path, _cfg())
    index = json.loads((tmp_path / "figures" / "gradcam" / "index.json").read_text())
    assert {m["task"] for m in index["montages"]} == {"klg", "osteophytes"}
    for m in index["montages"]:
        png = tmp_path / m["file"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert list(metrics.columns) == COLUMNS
    evaluated = read_metrics_part(tmp_path, "evaluate")
    assert len(evaluated) and set(evaluated["metric"]) <= set(metrics["metric"])  # evaluate's rows kept
    rows = read_metrics_part(tmp_path, "explain")
    assert set(rows["metric"]) == {*explain.CAM_METRICS, *explain.OCCLUSION_METRICS}
    cam_rows = rows[rows["metric"].isin(explain.CAM_METRICS)]
    assert set(cam_rows["task"]) == {"klg", "osteophytes"} and (cam_rows["split"] == "test").all()
    oste = cam_rows[cam_rows["task"] == "osteophytes"]
    assert (oste["n"] == 8).all()  # only images where the feature is present
    assert oste["value"].between(0, 1).all() and oste["ci_low"].notna().all()
    occluded = rows[rows["metric"].isin(explain.OCCLUSION_METRICS) & (rows["task"] == "osteophytes")]
    assert (occluded["n"] == 3).all()  # the first explain.occlusion_images of the same images
    # running explain again replaces its rows instead of appending, and evaluate's rows stay
    explain.run(tmp_path, _cfg())
    again = pd.read_csv(tmp_path / "metrics.csv")
    pd.testing.assert_frame_equal(again, metrics)


def test_explain_without_checkpoints_records_why(tmp_path):
    from kneeoa.stages import explain

    make_cam_run(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "checkpoints")
    explain.run(tmp_path, _cfg())
    index = json.loads((tmp_path / "figures" / "gradcam" / "index.json").read_text())
    assert index["montages"] == [] and "no checkpoints" in index["skipped"][0]["reason"]


def test_explain_broken_mask_file_is_named(tmp_path):
    from kneeoa.stages import explain

    make_cam_run(tmp_path)
    for p in (tmp_path / "masks").glob("*.npz"):
        p.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"Mask file .*\.npz cannot be used"):
        explain.run(tmp_path, _cfg())


def test_select_examples_balances_correct_and_wrong():
    from kneeoa.stages.explain import select_examples

    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])
    preds = make_prediction_table([f"i{i}" for i in range(5)], ["test"] * 5, [0, 0, 0, 1, 1], probs)
    chosen = select_examples(preds, 1, np.random.default_rng(0))
    assert len(chosen) == 4  # class 0: 1 correct + 1 wrong; class 1: 1 correct + 1 wrong
    assert chosen.groupby(["y_true", "correct"]).size().eq(1).all()
