"""The one preprocessing object: stored form (round trip, old checkpoints, bad payloads) and each step equal to the
code it replaced (the flip, the cache's quantisation, the CNN and encoder normalisations) on phantom crops."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from kneeoa.deploy.builtin import DEFAULT_MODEL, builtin_root
from kneeoa.errors import ConfigError
from kneeoa.synthetic.phantom import render_spec, simulate_cohort
from kneeoa.transforms.augment import POLICIES, BatchTransform, augment_batch
from kneeoa.transforms.preprocess import Preprocess, mirror, orient, standardise, to_uint8

CNN = Preprocess.for_cnn(48, 0.449, 0.226, in_chans=1, mirror_left=True, tta=False)
ENCODER = Preprocess(40, (32, 32), (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711),
                     "bicubic", "shortest", "open_clip_config.json")


@pytest.fixture(scope="module")
def crops() -> list[np.ndarray]:
    """Phantom knee crops of two sizes, as `load_gray` returns crops: float32 in [0, 1]."""
    specs = simulate_cohort(patients=2, visits=1, seed=3, low_quality_share=0.0)
    return [render_spec(s, out_px=px).image for s, px in zip(specs, (96, 96, 80, 64), strict=True)]


# The code paths the object replaced, as they were written before it (kept here as the reference).

def _old_flip(img):
    return np.ascontiguousarray(img[:, ::-1])


def _old_to_uint8(img, size):
    img = np.asarray(img, dtype=np.float32)
    if img.shape != (size, size):
        img = np.asarray(Image.fromarray(img, mode="F").resize((size, size), Image.BICUBIC), np.float32).clip(0, 1)
    return np.round(img * 255).astype(np.uint8)


def _old_cnn_input(img, pre):  # models.cnn.backbones.preprocess_fn
    x = torch.from_numpy(_old_to_uint8(img, pre["image_size"])).float() / 255.0
    return ((x - pre["mean"]) / pre["std"]).unsqueeze(0)


def _old_batch_normalise(x, mean, std):  # transforms.augment.normalise
    return (x.float() / 255.0 - mean) / std


def test_cnn_preprocess_round_trips_as_the_checkpoint_layout():
    stored = CNN.to_dict()
    assert stored == {"image_size": 48, "in_chans": 1, "mean": 0.449, "std": 0.226, "mirror_left": True, "tta": False}
    assert list(stored) == ["image_size", "in_chans", "mean", "std", "mirror_left", "tta"]
    assert Preprocess.from_dict(stored) == CNN
    assert Preprocess.from_dict(json.loads(json.dumps(stored))) == CNN  # as a package's member JSON reads back


def test_encoder_preprocess_round_trips_and_keeps_its_embedding_record():
    stored = ENCODER.to_dict()
    assert list(stored) == ["size", "crop", "mean", "std", "interpolation", "resize_mode", "source"]
    assert Preprocess.from_dict(json.loads(json.dumps(stored))) == ENCODER
    mirrored = replace(ENCODER, mirror_left=True)  # an encoder-and-head package that flips left knees
    assert mirrored.to_dict()["mirror_left"] is True and Preprocess.from_dict(mirrored.to_dict()) == mirrored


def test_old_checkpoint_payloads_are_read():
    first = Preprocess.from_dict({"image_size": 32, "in_chans": 1, "mean": 0.5, "std": 0.25})  # before mirroring/TTA
    assert (first.size, first.mean, first.std, first.mirror_left, first.tta, first.quantised) == (
        32, (0.5,), (0.25,), False, False, True)
    shipped = json.loads((builtin_root() / DEFAULT_MODEL / "weights" / "member0.json").read_text())["preprocess"]
    assert Preprocess.from_dict(shipped, "member0.json").to_dict() == shipped  # the built-in grader, field for field
    boost = {**ENCODER.to_dict(), "crop": [32, 32], "mean": list(ENCODER.mean), "mirror_left": False}
    assert Preprocess.from_dict(boost) == ENCODER  # an encoder-and-head package's model.json


@pytest.mark.parametrize(("payload", "field", "why"), [
    ({"image_size": 32, "in_chans": 1, "mean": 0.5}, "std", "missing"),
    ({"image_size": 32, "in_chans": 1, "mean": 0.5, "std": 0.25, "stdev": 0.25}, "stdev", "not one kneeoa knows"),
    ({"image_size": 32, "in_chans": 1, "mean": "0.5", "std": 0.25}, "mean", "must be a number"),
    ({"image_size": 0, "in_chans": 1, "mean": 0.5, "std": 0.25}, "image_size", "positive whole number"),
    ({"image_size": True, "in_chans": 1, "mean": 0.5, "std": 0.25}, "image_size", "positive whole number"),
    ({"image_size": 32, "in_chans": 1, "mean": 0.5, "std": 0.25, "tta": "yes"}, "tta", "true or false"),
    ({"size": 40, "crop": [32], "mean": [0.5] * 3, "std": [0.5] * 3}, "crop", r"\[height, width\]"),
    ({"size": 40, "crop": [32, 32], "mean": 0.5, "std": [0.5] * 3}, "mean", "a list of numbers"),
])
def test_a_bad_payload_names_its_file_and_field(payload, field, why):
    with pytest.raises(ConfigError, match=rf"ckpt\.pt: preprocess field '{field}'.*{why}"):
        Preprocess.from_dict(payload, "ckpt.pt")


def test_a_payload_of_no_known_layout_or_values_is_refused():
    with pytest.raises(ConfigError, match=r"ckpt\.pt: preprocess must be a mapping.*got list"):
        Preprocess.from_dict([160, 0.5], "ckpt.pt")
    with pytest.raises(ConfigError, match=r"neither 'image_size' .* nor 'size'.*\['mean', 'std'\]"):
        Preprocess.from_dict({"mean": 0.5, "std": 0.25}, "ckpt.pt")
    with pytest.raises(ConfigError, match=r"ckpt\.pt: .*resize mode 'crop' is not supported"):
        Preprocess.from_dict({**ENCODER.to_dict(), "resize_mode": "crop"}, "ckpt.pt")
    with pytest.raises(ConfigError, match="mean .* must give one value, or one per input channel"):
        Preprocess.from_dict({"size": 40, "crop": [32, 32], "mean": [0.5, 0.5], "std": [0.5, 0.5]})
    with pytest.raises(ConfigError, match="quantised .* make them with Preprocess.for_cnn"):
        replace(CNN, resize_mode="shortest")
    with pytest.raises(ConfigError, match="encoder inputs have three channels and no test-time views"):
        replace(ENCODER, tta=True)


def test_orient_is_the_old_flip_for_left_knees_only(crops):
    img = crops[0]
    assert np.array_equal(CNN.orient(img, "L"), _old_flip(img)) and CNN.orient(img, "L").flags.c_contiguous
    assert CNN.orient(img, "R") is img and replace(CNN, mirror_left=False).orient(img, "L") is img
    assert np.array_equal(mirror(mirror(img)), img)  # a map of an oriented crop goes back on the film
    assert np.array_equal(orient(img, "L", mirror_left=True), CNN.orient(img, "L"))


def test_quantise_is_the_cache_quantisation(crops):
    assert CNN.quantise(crops).dtype == np.uint8 and CNN.quantise([]).shape == (0, 48, 48)
    assert np.array_equal(CNN.quantise(crops), np.stack([_old_to_uint8(c, 48) for c in crops]))
    assert np.array_equal(to_uint8(crops[0], 96), _old_to_uint8(crops[0], 96))  # no resize at the crop's own size


def test_cnn_input_and_batch_normalisation_are_bitwise_the_old_ones(crops):
    old = {"image_size": 48, "mean": 0.449, "std": 0.226}
    batch = CNN(crops)
    assert batch.shape == (4, 1, 48, 48) and batch.dtype == torch.float32
    for img, x in zip(crops, batch, strict=True):
        assert torch.equal(x, _old_cnn_input(img, old)) and torch.equal(CNN.one(img), x)
    u8 = torch.from_numpy(CNN.quantise(crops)).unsqueeze(1)
    assert torch.equal(CNN.from_uint8(u8), _old_batch_normalise(u8, 0.449, 0.226))
    assert torch.equal(BatchTransform(CNN)((u8, {}))[0], _old_batch_normalise(u8, 0.449, 0.226))


def test_augmentation_folds_the_same_normalisation():
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 1, 16, 16), dtype=np.uint8))
    out = augment_batch(x, POLICIES.get("strong"), hflip=False, generator=torch.Generator().manual_seed(0),
                        mean=0.449, std=0.226, rows=(4, 12))
    assert (out[:, :, :4] == np.float32(-0.449 / 0.226)).all()  # black outside the band, normalised
    assert out.min() >= np.float32(-0.449 / 0.226) and out.max() <= np.float32((1 - 0.449) / 0.226)
    assert standardise(1.0, 0.449, 0.226) == (1 - 0.449) / 0.226


def test_encoder_input_is_the_old_per_channel_normalisation(crops):
    x = ENCODER(crops[:2])
    assert x.shape == (2, 3, 32, 32)
    resized = ENCODER.resize(torch.from_numpy(np.stack(crops[:2]))[:, None].expand(-1, 3, -1, -1))
    mean = torch.tensor(ENCODER.mean).view(1, -1, 1, 1)
    std = torch.tensor(ENCODER.std).view(1, -1, 1, 1)
    assert torch.equal(x, (resized - mean) / std)
    assert torch.equal(ENCODER(crops)[2], ENCODER.one(crops[2]))  # crops of several sizes, one by one


def test_a_checkpoint_with_a_bad_preprocess_is_refused_naming_its_folder():
    from kneeoa.models.cnn.infer import CnnPredictor

    payload = {"backbone": "twobranch", "tasks": {"klg": 5}, "state_dict": {},
               "preprocess": {"image_size": 32, "in_chans": 1, "mean": 0.5}}
    with pytest.raises(ConfigError, match=r"run/checkpoints/twobranch: preprocess field 'std' is missing"):
        CnnPredictor.from_payloads([payload], "run/checkpoints/twobranch")
