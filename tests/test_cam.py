"""Grad-CAM machinery (tiny timm CNNs and ViTs, a tiny Dinov2) and CAM scores against masks."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from kneeoa.errors import ConfigError
from kneeoa.explain import cam


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=5, in_chans=1, pretrained=False)
    return model.eval(), model.layer4[-1]


def test_gradcam_resnet_shape_and_range(resnet):
    model, layer = resnet
    x = torch.randn(2, 1, 64, 64)
    maps = cam.gradcam(model, layer, x, [0, 3])
    assert maps.shape == (2, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    # different classes give different maps
    assert not np.allclose(cam.gradcam(model, layer, x[:1], [0]), cam.gradcam(model, layer, x[:1], [4]))


def test_gradcam_convnext_stage():
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", num_classes=2, in_chans=1, pretrained=False).eval()
    maps = cam.gradcam(model, model.stages[-1], torch.randn(1, 1, 64, 64), [1])
    assert maps.shape == (1, 64, 64) and np.isfinite(maps).all()


def test_gradcam_needs_one_class_per_image(resnet):
    with pytest.raises(ValueError, match="one class per image"):
        cam.gradcam(*resnet, torch.randn(2, 1, 32, 32), [0])


def test_vit_reshape_transform_drops_prefix_tokens():
    tokens = torch.arange(2 * (5 + 6) * 3, dtype=torch.float32).reshape(2, 11, 3)  # CLS + 4 registers + 2x3 patches
    out = cam.vit_reshape_transform(tokens, (2, 3))
    assert out.shape == (2, 3, 2, 3)
    assert torch.equal(out[0, :, 0, 0], tokens[0, 5]) and torch.equal(out[1, :, 1, 2], tokens[1, 10])
    with pytest.raises(ValueError, match="cannot fill a 4x4"):
        cam.vit_reshape_transform(tokens, (4, 4))


def test_vit_cam_timm():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=3, in_chans=1, pretrained=False).eval()
    maps = cam.vit_cam(vit, vit.blocks[-1].norm1, torch.randn(2, 1, 64, 64), [0, 2], grid=(4, 4))
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all() and maps.max() > 0


def test_vit_cam_transformers_dinov2_with_linear_head():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=56, patch_size=14, num_channels=3)
    encoder = Dinov2Model(config).eval()
    probe = torch.nn.Linear(32, 2)
    maps = cam.vit_cam(encoder, encoder.encoder.layer[-1].norm1, torch.randn(1, 3, 56, 56), [1], grid=(4, 4),
                       head=lambda out: probe(out.pooler_output))
    assert maps.shape == (1, 56, 56) and np.isfinite(maps).all() and maps.max() > 0


# ------------------------------------------------------------------------------------------------ scoring


def _mask(shape=(64, 64)):
    m = np.zeros(shape, bool)
    m[20:36, 10:30] = True
    return m


def test_energy_exactly_inside_mask_is_one():
    m = _mask()
    inside = np.where(m, np.random.default_rng(0).random(m.shape), 0.0)
    assert cam.energy_in_mask(inside, m) == pytest.approx(1.0)
    assert cam.energy_in_mask(np.ones(m.shape), m) == pytest.approx(m.mean())
    assert np.isnan(cam.energy_in_mask(np.zeros(m.shape), m))


def test_pointing_game_tolerance():
    m = _mask()
    c = np.zeros(m.shape)
    c[38, 15] = 1  # two rows below the mask
    assert not cam.pointing_hit(c, m, 0) and not cam.pointing_hit(c, m, 1)
    assert cam.pointing_hit(c, m, 3)


def test_random_baseline_matches_area_share():
    rng = np.random.default_rng(0)
    m = _mask()
    energies = [cam.energy_in_mask(cam.random_map(m.shape, 4.0, rng), m) for _ in range(300)]
    assert np.mean(energies) == pytest.approx(m.mean(), abs=0.02)
    hits = [cam.pointing_hit(cam.random_map(m.shape, 4.0, rng), m) for _ in range(300)]
    assert np.mean(hits) == pytest.approx(m.mean(), abs=0.08)


@pytest.mark.parametrize("sigma", [2.0, 5.0])
def test_autocorrelation_recovers_noise_smoothness(sigma):
    rng = np.random.default_rng(1)
    maps = np.stack([cam.random_map((96, 96), sigma, rng) for _ in range(20)])
    est = cam.sigma_for_halfwidth(cam.autocorrelation_halfwidth(maps))
    assert est == pytest.approx(sigma, rel=0.2)


def test_score_maps_perfect_cam_beats_random():
    rng = np.random.default_rng(2)
    masks = [_mask() for _ in range(10)]
    from scipy import ndimage

    cams = [ndimage.gaussian_filter(m.astype(float), 2)[::4, ::4] for m in masks]  # coarse, like a last layer
    out = cam.score_maps(cams, masks, tolerance=2, rng=rng)
    assert out["cam_energy_in_mask"].mean() > out["cam_energy_in_mask_random"].mean() + 0.4
    assert out["cam_pointing_game"].mean() == 1.0
    assert out["cam_energy_in_mask_random"].mean() < 0.3
    assert float(out["sigma"]) > 1


def test_task_mask_klg_is_union_and_errors():
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[0, 0] = b[3, 3] = True
    masks = {"osteophytes": a, "jsn": b, "sclerosis": np.zeros((4, 4), bool), "joint": np.ones((4, 4), bool)}
    assert cam.task_mask(masks, "klg").sum() == 2
    assert cam.task_mask(masks, "jsn").sum() == 1
    with pytest.raises(ConfigError, match="No feature mask defines task 'knee_id'"):
        cam.task_mask(masks, "knee_id")
    with pytest.raises(KeyError, match="lacks array"):
        cam.task_mask({"jsn": b}, "klg")
