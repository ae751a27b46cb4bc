"""Grad-CAM through the encoders of the linear-probe arms: kept probes, the differentiable classifier, its errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import make_tiny_run
from kneeoa.arms.encoder_cam import ProbeClassifier, encoder_arm_classifier, probe_arms
from kneeoa.config import Config
from kneeoa.errors import ConfigError, MissingInputError, WeightsNotFoundError
from kneeoa.explain import cam
from kneeoa.models.encoders.foundation import get_encoder_spec
from kneeoa.models.estimators import XGBHead
from kneeoa.models.probes import fit_linear
from kneeoa.runfolder.embeddings import embedding_matrix, read_embeddings
from kneeoa.runfolder.heads import head_path, read_linear_probe, write_linear_probe
from kneeoa.runfolder.manifest import load_knee, read_manifest
from kneeoa.runfolder.predictions import prediction_path, read_predictions
from kneeoa.sources.manifest import write_manifest
from kneeoa.stages import boost, embed
from standins import build_kneessl, build_raddino

ENCODERS = ("biomedclip", "rad-dino", "kneessl", "random")
TASKS = ("klg", "osteophytes")


def _arm(encoder: str) -> str:
    return f"{get_encoder_spec(encoder).arm_prefix}_linear"


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory, standin_snapshots):
    """A tiny run through the real embed and boost stages with every encoder; left knees mirrored, as prepare marks
    them with data.mirror_left."""
    run = tmp_path_factory.mktemp("encoder_cam") / "run"
    manifest = make_tiny_run(run)
    manifest["mirrored"] = manifest["side"] == "L"
    write_manifest(manifest, run)
    cfg = Config()
    cfg.tasks.names = list(TASKS)
    fc = cfg.foundation
    knee = build_kneessl(run.parent / "kneessl", image_size=96)  # a grid of 3 x 4 cells at the fold, not 1 x 2
    fc.encoders = list(ENCODERS)
    fc.weights = {"biomedclip": str(standin_snapshots["biomedclip"]), "rad-dino": str(standin_snapshots["rad-dino"]),
                  "kneessl": str(knee), "random": str(knee)}
    fc.precision, fc.batch_size, fc.device, fc.n_jobs = "fp32", 8, "cpu", 1
    fc.xgb_grid, fc.xgb_n_estimators, fc.xgb_early_stopping = {"max_depth": [2]}, 5, 2
    fc.linear_c_grid = [1.0]
    embed.run(run, cfg)
    boost.run(run, cfg)
    return run, cfg


@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 4], [0, 1, 3], [1, 3]], ids=["all", "absent", "two_of_five"])
def test_a_kept_probe_reproduces_the_pipeline(probed_run, tmp_path, labels):
    run, _ = probed_run
    X = embedding_matrix(read_embeddings(run, "rad-dino")[0]).astype(np.float64)  # real (stand-in) features
    y = np.asarray(labels)[np.arange(len(X)) % len(labels)]
    cfg = Config()
    cfg.foundation.linear_c_grid = [1.0]
    pipeline, _ = fit_linear(X[:16], y[:16], X[16:], y[16:], 5, cfg)
    probe = read_linear_probe(write_linear_probe(pipeline, tmp_path / "heads" / "arm" / "klg.json", 5))
    expected = np.zeros((len(X), 5))
    expected[:, pipeline.classes_] = pipeline.predict_proba(X)
    np.testing.assert_allclose(probe.predict_proba(X), expected, rtol=0, atol=1e-9)
    assert np.isneginf(probe.logits(X)[:, [k for k in range(5) if k not in labels]]).all()


def test_boost_keeps_a_probe_per_linear_arm_and_task_and_export_heads_stay_xgboost(probed_run):
    run, _ = probed_run
    manifest = read_manifest(run)
    assert sorted(probe_arms(run)) == sorted(_arm(e) for e in ENCODERS)
    for encoder in ENCODERS:
        X = embedding_matrix(read_embeddings(run, encoder)[0])
        rows = manifest.reset_index(drop=True).reset_index().set_index("image_id")["index"]
        for task in TASKS:
            probe = read_linear_probe(head_path(run, _arm(encoder), task))
            _, _, table = read_predictions(prediction_path(run, _arm(encoder), task))
            probs = probe.predict_proba(X[rows.loc[table["image_id"]].to_numpy()])
            np.testing.assert_allclose(probs, table.filter(like="prob_").to_numpy(), rtol=0, atol=1e-5)
            xgb = head_path(run, f"{get_encoder_spec(encoder).arm_prefix}_xgb", task)
            assert XGBHead.load(xgb).n_classes == probe.n_classes
            with pytest.raises(WeightsNotFoundError, match=r"is not a linear probe \(kind None\)"):
                read_linear_probe(xgb)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_the_classifier_is_the_probe_on_the_encoder_and_its_cams_are_maps(probed_run, encoder):
    run, cfg = probed_run
    rows = read_manifest(run).iloc[:3]
    assert rows["mirrored"].any() and not rows["mirrored"].all()
    images = [load_knee(run, r) for r in rows.to_dict("records")]  # as explain reads them: mirrored rows flipped
    for task in TASKS:
        model, layer, preprocess, reshape = encoder_arm_classifier(run, _arm(encoder), task, cfg)
        assert isinstance(model, ProbeClassifier) and any(m is layer for m in model.model.modules())
        x = torch.stack([preprocess(im) for im in images])
        logits = model(x)
        probe = read_linear_probe(head_path(run, _arm(encoder), task))
        np.testing.assert_allclose(logits.detach().numpy(), probe.logits(model.encoder.encode(images)), rtol=0,
                                   atol=1e-5)
        _, _, table = read_predictions(prediction_path(run, _arm(encoder), task))
        np.testing.assert_allclose(torch.softmax(logits, dim=1).detach().numpy(),  # the arm's own probabilities
                                   table.set_index("image_id").loc[rows["image_id"]].filter(like="prob_"), atol=1e-5)
    # osteophytes is binary: its two logits are -s/2 and s/2, so each image's two class maps are the positive and
    # negative parts of one raw map, and at least one of them varies unless the gradients never reach the layer
    both = torch.cat([x, x])
    classes = [0] * len(x) + [1] * len(x)
    maps = cam.gradcam(model, layer, both, classes, reshape_transform=reshape)
    assert maps.shape == (2 * len(x), *x.shape[-2:]) and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    varies = np.ptp(maps, axis=(1, 2)) > 0
    assert (varies[:len(x)] | varies[len(x):]).all()
    if reshape is not None:  # the ViTs: the same maps through kneeoa.explain.cam's ViT entry point
        np.testing.assert_allclose(cam.vit_cam(model, layer, both, classes, grid=reshape.keywords["grid"]), maps,
                                   atol=1e-5)
    else:
        assert get_encoder_spec(encoder).library in ("kneessl", "random")


def test_a_missing_probe_names_boost(probed_run):
    run, cfg = probed_run
    with pytest.raises(WeightsNotFoundError, match=r"heads/raddino_linear/jsn\.json is missing.*`kneeoa boost "):
        encoder_arm_classifier(run, "raddino_linear", "jsn", cfg)


def test_missing_or_other_weights_name_the_folder_the_run_used(probed_run, tmp_path):
    run, cfg = probed_run
    moved = dataclasses.replace(cfg.foundation, weights={"rad-dino": str(tmp_path / "nowhere")})
    with pytest.raises(WeightsNotFoundError, match=r"RAD-DINO arms needs the weights their embeddings came from .*Set "
                                                   r"foundation\.weights\.rad-dino to the folder the run used"):
        encoder_arm_classifier(run, "raddino_linear", "klg", dataclasses.replace(cfg, foundation=moved))
    other = dataclasses.replace(cfg.foundation, weights={"rad-dino": str(build_raddino(tmp_path / "other", seed=1))})
    with pytest.raises(WeightsNotFoundError, match=r"are not those that made .*rad-dino\.json"):
        encoder_arm_classifier(run, "raddino_linear", "klg", dataclasses.replace(cfg, foundation=other))


def test_only_linear_arms_that_ran_are_explained_through_the_encoder(probed_run):
    run, cfg = probed_run
    with pytest.raises(ConfigError, match=r"'xgb' head, which gradients do not flow through.*occlusion"):
        encoder_arm_classifier(run, "raddino_xgb", "klg", cfg)
    with pytest.raises(MissingInputError, match=r"arms/resnet18_linear\.json does not exist"):
        encoder_arm_classifier(run, "resnet18_linear", "klg", cfg)


def test_the_explain_stage_draws_gradcam_and_occlusion_for_the_linear_arms(probed_run, tmp_path):
    """Wired into explain: each linear-probe arm gets a Grad-CAM montage through its encoder and an occlusion
    montage of the same knees; the XGBoost arms get occlusion only."""
    import shutil

    from kneeoa.runfolder.montages import GRADCAM, OCCLUSION
    from kneeoa.stages import explain

    src, cfg = probed_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    cfg = dataclasses.replace(cfg, explain=dataclasses.replace(cfg.explain, per_grade=1, occlusion_patch=0.5,
                                                               occlusion_stride=0.5))
    explain.run(run, cfg)
    cams = {(m["arm"], m["task"]) for m in GRADCAM.read_index(run)["montages"]}
    occl = {(m["arm"], m["task"]) for m in OCCLUSION.read_index(run)["montages"]}
    linear = {(_arm(e), t) for e in ENCODERS for t in TASKS}
    assert cams == linear
    assert linear | {(a.replace("_linear", "_xgb"), t) for a, t in linear} == occl
    for arm, task in linear:
        assert (run / GRADCAM.montage_file(arm, task)).stat().st_size > 1000


def test_the_explain_command_prints_what_it_drew_and_exits_0(probed_run, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from kneeoa.cli.app import app
    from kneeoa.config import dump_config

    src, cfg = probed_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    cfg = dataclasses.replace(cfg, explain=dataclasses.replace(cfg.explain, per_grade=1, occlusion=False))
    study = tmp_path / "study.yaml"
    study.write_text(dump_config(cfg))
    res = CliRunner().invoke(app, ["explain", str(run), "-c", str(study)])
    assert res.exit_code == 0, res.output
    assert f"Grad-CAM: {len(ENCODERS) * len(TASKS)} montage(s), 0 skipped" in res.output
