"""ECE, Brier score and reliability tables against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from kneeoa.errors import ConfigError
from kneeoa.stats import bootstrap, calibration, weighted


def test_ece_binary_hand_computed():
    # prob_1 = 0.8 (bin 8, outcome 1) and 0.4 (bin 4, outcome 0): (|1 - 0.8| + |0 - 0.4|) / 2 = 0.3
    y = np.array([1, 0])
    p = np.array([[0.2, 0.8], [0.6, 0.4]])
    assert calibration.ece(y, p, n_bins=10) == pytest.approx(0.3)
    # one bin: |mean outcome - mean prob_1| = |0.5 - 0.6| = 0.1
    assert calibration.ece(y, p, n_bins=1) == pytest.approx(0.1)


def test_ece_multiclass_top_label_hand_computed():
    y = np.array([0, 1, 2, 2])
    p = np.array([[0.7, 0.2, 0.1],   # conf 0.7, bin [0.5, 0.75), correct
                  [0.6, 0.3, 0.1],   # conf 0.6, bin [0.5, 0.75), wrong
                  [0.1, 0.1, 0.8],   # conf 0.8, bin [0.75, 1], correct
                  [0.2, 0.3, 0.5]])  # conf 0.5, bin [0.5, 0.75), correct
    # bin [0.5, 0.75): outcomes 2, confidences 1.8 -> 0.2; bin [0.75, 1]: 1 vs 0.8 -> 0.2; (0.2 + 0.2) / 4
    assert calibration.ece(y, p, n_bins=4) == pytest.approx(0.1)


def test_perfectly_calibrated_and_confident_is_zero():
    y = np.array([0, 1, 1])
    p = np.eye(2)[y]
    assert calibration.ece(y, p) == 0 and calibration.brier(y, p) == 0


def test_brier_binary_and_multiclass_hand_computed():
    assert calibration.brier(np.array([1, 0]), np.array([[0.2, 0.8], [0.6, 0.4]])) == pytest.approx(0.1)
    # (0.3^2 + 0.2^2 + 0.1^2) and (0.2^2 + 0.5^2 + 0.3^2): 0.14 and 0.38 -> mean 0.26
    y = np.array([0, 1])
    p = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    assert calibration.brier(y, p) == pytest.approx(0.26)


def test_weighted_forms_match_resampling():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)
    p = rng.dirichlet(np.ones(3), 40)
    w = bootstrap.bootstrap_weights(np.arange(40) // 2, 20, 30, rng)
    point = {"ece": lambda a, b: calibration.ece(a, b, n_bins=5), "brier": calibration.brier}
    for name, (pt, weighted_fn) in calibration.calibration_metrics(5).items():
        np.testing.assert_allclose(weighted_fn(y, p, w), weighted.resampled(point[name])(y, p, w), atol=1e-12)
        assert pt(y, p) == pytest.approx(point[name](y, p))


def test_reliability_table():
    y = np.array([1, 0, 1, 1])
    p = np.array([[0.9, 0.1], [0.85, 0.15], [0.3, 0.7], [0.2, 0.8]])
    t = calibration.reliability_table(y, p, n_bins=2)
    assert t["n"].tolist() == [2, 2]
    assert t["observed"].tolist() == [0.5, 1.0]
    assert t["confidence"].tolist() == pytest.approx([0.125, 0.75])


def test_bad_bins_raise():
    with pytest.raises(ConfigError, match="calibration_bins must be a positive"):
        calibration.calibration_metrics(0)
