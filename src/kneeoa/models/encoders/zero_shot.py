"""CLIP zero-shot classification as pure functions: prompts from labels, probabilities from embeddings.

The zeroshot stage grades the run's knees with them; `kneeoa.arms.predictors` re-runs a zero-shot arm on new
(occluded) crops with the same prompts, so both give the same numbers.
"""

from __future__ import annotations

import numpy as np

from kneeoa.errors import ConfigError


def prompts(labels: list[str], template: str) -> list[str]:
    """One text prompt per label.

    Example:
        >>> prompts(["knee X-ray", "chest X-ray"], "this is a photo of {label}")
        ['this is a photo of knee X-ray', 'this is a photo of chest X-ray']
    """
    if "{label}" not in template:
        raise ConfigError(f"zeroshot.template must contain '{{label}}' where the label goes. Got {template!r}.")
    return [template.format(label=label) for label in labels]


def zero_shot_probs(image_features: np.ndarray, text_features: np.ndarray, logit_scale: float) -> np.ndarray:
    """CLIP zero-shot class probabilities.

    Args:
        image_features: (N, D) projected image embeddings. text_features: (C, D) one per class prompt.
        logit_scale: the model's learned temperature (exp of its logit_scale parameter).

    Returns:
        (N, C) float64, softmax(logit_scale * cos(image, text)); rows sum to 1.

    Example:
        >>> zero_shot_probs(np.array([[1.0, 0.0]]), np.array([[2.0, 0.0], [0.0, 1.0]]), 100.0).round(3).tolist()
        [[1.0, 0.0]]
    """
    img = np.asarray(image_features, dtype=np.float64)
    txt = np.asarray(text_features, dtype=np.float64)
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    logits = logit_scale * img @ txt.T
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)
