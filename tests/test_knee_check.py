"""The learned knee check: two Gaussian views (layout, grader features), calibrated on held-out training patients."""

from __future__ import annotations

import numpy as np
import pytest

from kneeoa.models.knee_check import KNEE_CHECKS, THUMB, KneeCheck, equalised, film_like, layout


def _knee(rng, n=64):
    """A crude knee-like crop: two bright bones with a dark gap across the middle, plus noise."""
    y, x = np.mgrid[0:n, 0:n] / n
    bone = (np.abs(x - 0.5) < 0.3 + 0.05 * rng.standard_normal()) & (np.abs(y - 0.5 + 0.03 * rng.standard_normal())
                                                                    > 0.04)
    return np.clip(0.2 + 0.6 * bone + rng.normal(0, 0.05, (n, n)), 0, 1).astype(np.float32)


def _features(crops, sides):
    """Stand-in grader features: row and column means of the crop."""
    return np.stack([np.concatenate([c.mean(axis=0)[::4], c.mean(axis=1)[::4]]) for c in crops])


def _fitted(rng, n=600, alpha=0.02, thumb=THUMB):
    crops = [_knee(rng) for _ in range(n)]
    described = KneeCheck.describe(crops, ["R"] * n, _features, thumb=thumb)
    films = np.stack([layout(film_like(c, rng), thumb) for c in crops])
    groups = np.arange(n) // 2
    return KNEE_CHECKS.get("layout_features").fit(described, groups, film_layouts=films, film_groups=groups,
                                                  alpha=alpha)


def test_knees_pass_and_other_images_are_refused():
    rng = np.random.default_rng(0)
    check = _fitted(rng)
    knees = check.scores([_knee(rng) for _ in range(400)], ["R"] * 400, _features)
    assert (knees < check.threshold).mean() < 0.05 and 0.3 < np.median(knees) < 0.7
    others = [np.rot90(_knee(rng)) for _ in range(20)] + [rng.random((64, 64)).astype(np.float32) for _ in range(20)]
    assert (check.scores(others, ["R"] * 40, _features) < check.threshold).all()
    assert check.threshold == check.alpha / 2


def test_state_round_trip_scores_alike():
    rng = np.random.default_rng(1)
    check = _fitted(rng, n=400, alpha=0.04)
    arrays, meta = check.state()
    again = KneeCheck.from_state(arrays, meta)
    crops = [_knee(rng) for _ in range(30)]
    assert np.array_equal(again.scores(crops, ["R"] * 30, _features), check.scores(crops, ["R"] * 30, _features))
    assert meta["views"]["layout"]["dim"] == THUMB * THUMB and meta["threshold"] == 0.02 and meta["thumb"] == THUMB


def test_a_check_keeps_the_thumbnail_side_it_was_fitted_with():
    """Packages fitted with 16 px layouts (before the side became 12) still score with 16 px after a round trip."""
    rng = np.random.default_rng(4)
    old = KneeCheck.from_state(*_fitted(rng, n=400, alpha=0.04, thumb=16).state())
    assert old.thumb == 16 != THUMB and old.state()[1]["views"]["layout"]["dim"] == 256
    crops = [_knee(rng) for _ in range(30)]
    by_hand = old.view_scores(KneeCheck.describe(crops, ["R"] * 30, _features, thumb=16))
    assert np.array_equal(old.scores(crops, ["R"] * 30, _features), np.minimum(*by_hand.values()))
    with pytest.raises(ValueError):
        old.view_scores(KneeCheck.describe(crops, ["R"] * 30, _features))


def test_too_few_knees_to_calibrate_is_an_error():
    rng = np.random.default_rng(2)
    crops = [_knee(rng) for _ in range(100)]
    described = KneeCheck.describe(crops, ["R"] * 100, _features)
    with pytest.raises(ValueError, match="too few to set a threshold"):
        KneeCheck.fit(described, np.arange(100) // 2, alpha=0.005)
    with pytest.raises(ValueError, match="at least 10 training knees of 4 patients"):
        KneeCheck.fit({k: v[:8] for k, v in described.items()}, np.arange(8), alpha=0.5)


def test_equalising_removes_exposure_and_film_like_copies_stay_in_range():
    rng = np.random.default_rng(3)
    crop = _knee(rng)
    assert np.allclose(equalised(crop), equalised(0.1 + 0.5 * crop ** 1.7), atol=1e-6)
    copy = film_like(crop, rng)
    assert copy.shape == crop.shape and 0 <= copy.min() and copy.max() <= 1 and not np.array_equal(copy, crop)
