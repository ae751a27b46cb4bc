"""Occlusion maps (Zeiler & Fergus 2014): where covering the image lowers a class's probability, for any model.

A square patch slides over the crop; each occluded copy is graded again and the drop in the explained class's
probability is spread over the pixels the patch covered. A pixel's value is the mean drop over the patches covering
it, ReLU'd (only what supports the class counts) and min-max scaled to [0, 1] per image, as pytorch-grad-cam scales
its maps, so `kneeoa.explain.cam.score_maps` scores an occlusion map exactly as it scores a CAM.

The patch is filled with the image's own mean intensity. Black or white would add a feature of its own (a dark
square reads as joint space or background, a bright one as bone or an osteophyte); the mean removes the structure
under the patch while keeping the image's overall brightness, which the grading models are sensitive to.

The model is only called, never differentiated, so the same map exists for a CNN, an encoder + boosted trees, or
anything else that maps crops to class probabilities. Everything here is pure (arrays and a function in, an array
out); the explain stage loads the crops and the arms (`kneeoa.arms.predictors`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

#: Float crops (H, W) in [0, 1] -> (n, K) class probabilities.
Predict = Callable[[Sequence[np.ndarray]], np.ndarray]


def _pixels(share: float, side: int, what: str) -> int:
    if not 0 < share <= 1:
        raise ValueError(f"The occlusion {what} is a share of the crop side in (0, 1]; got {share!r}. A {what} "
                         "above 1 would be larger than the image (explain.occlusion_patch / occlusion_stride).")
    return max(1, round(share * side))


def positions(side: int, patch: int, stride: int) -> list[int]:
    """Top-left offsets of the patch along one side: every `stride` pixels, plus the last one flush with the edge.

    Example:
        >>> positions(10, 4, 3)
        [0, 3, 6]
        >>> positions(10, 4, 4)
        [0, 4, 6]
    """
    starts = list(range(0, side - patch + 1, stride))
    return starts if starts[-1] == side - patch else [*starts, side - patch]


def _checked(probs: np.ndarray, n: int, cls: int) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != n:
        raise ValueError(f"The model's predict returned shape {probs.shape} for {n} crop(s); it must return (n, K) "
                         "class probabilities, one row per crop.")
    if not 0 <= cls < probs.shape[1]:
        raise ValueError(f"Class {cls} cannot be explained: the model predicts {probs.shape[1]} classes.")
    if not np.isfinite(probs).all():
        raise ValueError(f"The model's predict returned non-finite probabilities for {n} crop(s) "
                         f"({int((~np.isfinite(probs)).sum())} value(s)); occlusion needs finite ones.")
    return probs


def scale_like_cam(drop: np.ndarray) -> np.ndarray:
    """ReLU, then min-max to [0, 1] (pytorch-grad-cam's `scale_cam_image`); an all-zero map stays zero."""
    m = np.maximum(drop, 0.0)
    m = m - m.min()
    top = m.max()
    return (m / top if top > 0 else m).astype(np.float32)


def occlusion_map(predict: Predict, image: np.ndarray, cls: int, *, patch: float = 0.2, stride: float = 0.1,
                  batch: int = 64, fill: float | None = None) -> np.ndarray:
    """The occlusion map of one crop for one class.

    Args:
        predict: float crops (H, W) in [0, 1] -> (n, K) probabilities (one call per batch of occluded copies).
        image: (H, W) float crop, as the model takes it.
        cls: the class whose probability drop is mapped.
        patch: patch side as a share of the image side (rows and columns each), in (0, 1].
        stride: step between patch positions as a share of the image side, in (0, 1]; the last position is flush
            with the edge, so every pixel is covered.
        batch: occluded copies per `predict` call; the map does not depend on it.
        fill: the patch's value; default the image's mean.

    Returns:
        (H, W) float32 map in [0, 1]: per pixel, the mean drop of class `cls`'s probability over the patches covering
        it, ReLU'd and min-max scaled.

    Raises:
        ValueError: a non-2-D or non-finite image, a patch or stride outside (0, 1], a batch below 1, or a `predict`
            that returns the wrong shape or non-finite values.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2 or image.size == 0 or not np.isfinite(image).all():
        raise ValueError(f"occlusion_map needs one finite 2-D crop (H, W); got shape {image.shape}.")
    if batch < 1:
        raise ValueError(f"The occlusion batch must be at least 1; got {batch}.")
    h, w = image.shape
    ph, pw = _pixels(patch, h, "patch"), _pixels(patch, w, "patch")
    sh, sw = _pixels(stride, h, "stride"), _pixels(stride, w, "stride")
    value = float(image.mean()) if fill is None else float(fill)
    base = _checked(predict([image]), 1, cls)[0, cls]
    boxes = [(y, x) for y in positions(h, ph, sh) for x in positions(w, pw, sw)]
    total = np.zeros((h, w))
    count = np.zeros((h, w))
    for start in range(0, len(boxes), batch):
        part = boxes[start:start + batch]
        copies = []
        for y, x in part:
            c = image.copy()
            c[y:y + ph, x:x + pw] = value
            copies.append(c)
        probs = _checked(predict(copies), len(copies), cls)[:, cls]
        for (y, x), p in zip(part, probs, strict=True):
            total[y:y + ph, x:x + pw] += base - p
            count[y:y + ph, x:x + pw] += 1
    return scale_like_cam(total / count)
