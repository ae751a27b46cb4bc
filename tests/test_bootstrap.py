"""The statistics maths: patient bootstrap, weighted metric forms, DeLong, Holm, ROC bands, CI formatting."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from sklearn import metrics as skm

from kneeoa.errors import ConfigError
from kneeoa.report.formatting import format_ci
from kneeoa.stats import bootstrap, comparisons, weighted
from kneeoa.stats.metrics import METRICS, metrics_for
from kneeoa.tasks import get_task


def class_probs(rng, y, k, signal=1.5):
    """Noisy class probabilities that favour the true class by `signal` logits."""
    logits = rng.normal(size=(len(y), k))
    logits[np.arange(len(y)), y] += signal
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def binary_data():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 120)
    return y, class_probs(rng, y, 2), np.repeat(np.arange(60), 2)


@pytest.fixture
def ordinal_data():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, 150)
    return y, class_probs(rng, y, 5), np.repeat(np.arange(50), 3)


# ------------------------------------------------------------------------------------------------ resampling


def test_patient_weights_move_a_patients_images_together():
    codes = np.array([0, 0, 1, 2, 2, 2])
    w = bootstrap.bootstrap_weights(codes, 3, 50, np.random.default_rng(0))
    assert w.shape == (50, 6)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 5]).all()
    # each resample draws 3 patients: weights summed over one image per patient give 3
    assert (w[:, [0, 2, 3]].sum(axis=1) == 3).all()
    again = bootstrap.bootstrap_weights(codes, 3, 50, np.random.default_rng(0))
    assert (w == again).all()


def test_patient_codes_group_by_id():
    codes, n = bootstrap.patient_codes(["b", "a", "b", "c"])
    assert n == 3 and codes[0] == codes[2] and len(set(codes)) == 3


@pytest.mark.parametrize("n_boot", [0, -5])
def test_bad_n_boot_raises(n_boot):
    with pytest.raises(ConfigError, match="n_boot must be a positive"):
        bootstrap.bootstrap_weights(np.zeros(3, int), 1, n_boot, np.random.default_rng(0))


def test_bad_confidence_raises():
    with pytest.raises(ConfigError, match="confidence must be between 0 and 1"):
        bootstrap.percentile_interval(np.arange(10.0), 1.5)


def test_percentile_interval_ignores_nan():
    lo, hi = bootstrap.percentile_interval(np.r_[np.arange(101.0), np.nan], 0.9)
    assert (lo, hi) == pytest.approx((5.0, 95.0))
    assert np.isnan(bootstrap.percentile_interval(np.array([np.nan]))).all()


# ------------------------------------------------------------------------------------------------ weighted metrics


@pytest.mark.parametrize("task", ["osteophytes", "klg"])
def test_weighted_forms_equal_point_and_bruteforce(task, binary_data, ordinal_data):
    y, probs, pid = binary_data if task != "klg" else ordinal_data
    codes, n_pat = bootstrap.patient_codes(pid)
    w = bootstrap.bootstrap_weights(codes, n_pat, 25, np.random.default_rng(3))
    for m in metrics_for(get_task(task)):
        fast = METRICS.get(m.name).weighted_fn
        assert fast(y, probs, np.ones((1, len(y))))[0] == pytest.approx(m.fn(y, probs), abs=1e-12), m.name
        np.testing.assert_allclose(fast(y, probs, w), weighted.resampled(m.fn)(y, probs, w), atol=1e-12,
                                   err_msg=m.name)


def test_every_registered_metric_has_a_vectorised_form():
    missing = [name for name, m in METRICS.items() if m.weighted is None]
    assert not missing, f"metrics bootstrapped by brute force: {missing}"


def test_weighted_auc_handles_ties_like_sklearn():
    y = np.array([0, 1, 0, 1, 1, 0, 0])
    s = np.array([0.5, 0.5, 0.2, 0.9, 0.5, 0.9, 0.1])
    assert weighted.weighted_binary_auc(y, s, np.ones((1, 7)))[0] == pytest.approx(skm.roc_auc_score(y, s))


def test_bootstrap_point_estimates_equal_sklearn(binary_data, ordinal_data):
    w_of = lambda pid: bootstrap.bootstrap_weights(*bootstrap.patient_codes(pid), 100, np.random.default_rng(0))  # noqa: E731
    y, p, pid = binary_data
    w = w_of(pid)
    expected = {"auc": skm.roc_auc_score(y, p[:, 1]), "accuracy": skm.accuracy_score(y, p.argmax(1)),
                "balanced_accuracy": skm.balanced_accuracy_score(y, p.argmax(1))}
    for name, value in expected.items():
        ci = bootstrap.bootstrap_ci(y, p, w, point=METRICS.get(name).fn, weighted=METRICS.get(name).weighted_fn)
        assert ci.value == pytest.approx(value, abs=1e-12)
        assert ci.low <= ci.value <= ci.high
    y, p, pid = ordinal_data
    ci = bootstrap.bootstrap_ci(y, p, w_of(pid), point=METRICS.get("kappa_quadratic").fn,
                            weighted=METRICS.get("kappa_quadratic").weighted_fn)
    assert ci.value == pytest.approx(skm.cohen_kappa_score(y, p.argmax(1), weights="quadratic"), abs=1e-12)
    assert ci.low < ci.value < ci.high


# ------------------------------------------------------------------------------------------------ DeLong

# Hanley & McNeil (1982), Radiology 143:29-36, Table I: 109 CT images rated 1 (definitely normal) to 5 (definitely
# abnormal). Published: area (Wilcoxon) 0.893, standard error 0.032.
HM_NORMAL = [33, 6, 6, 11, 2]
HM_ABNORMAL = [3, 2, 2, 11, 33]


def _hanley_mcneil():
    ratings = np.arange(1, 6)
    score = np.r_[np.repeat(ratings, HM_NORMAL), np.repeat(ratings, HM_ABNORMAL)].astype(float)
    y = np.r_[np.zeros(sum(HM_NORMAL)), np.ones(sum(HM_ABNORMAL))]
    return y, score


def _bruteforce_delong(y, scores):
    """DeLong et al. (1988) straight from the definition: psi over all positive-negative pairs."""
    y = y.astype(bool)
    v10, v01, aucs = [], [], []
    for s in scores:
        psi = (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    m, n = y.sum(), (~y).sum()
    return np.array(aucs), np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n


def test_delong_hanley_mcneil_published_example():
    y, score = _hanley_mcneil()
    res = comparisons.delong(y, score)
    assert res.aucs[0] == pytest.approx(0.893, abs=5e-4)
    assert np.sqrt(res.cov[0, 0]) == pytest.approx(0.032, abs=1.5e-3)


def test_fast_delong_equals_definition():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 80)
    scores = np.vstack([y + rng.normal(size=80), np.round(y * 0.5 + rng.normal(size=80), 1)])
    res = comparisons.delong(y, scores)
    aucs, cov = _bruteforce_delong(y, scores)
    np.testing.assert_allclose(res.aucs, aucs, atol=1e-12)
    np.testing.assert_allclose(res.cov, cov, atol=1e-12)
    np.testing.assert_allclose(res.aucs, [skm.roc_auc_score(y, s) for s in scores], atol=1e-12)
    test = comparisons.delong_test(y, scores[0], scores[1])
    z = (aucs[0] - aucs[1]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert test.p_value == pytest.approx(2 * sps.norm.sf(abs(z)))
    assert test.low < test.difference < test.high


def test_clustered_delong_does_not_count_duplicate_knees_twice():
    """Each patient imaged twice identically: the clustered variance matches one image per patient."""
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 100)
    s = y + rng.normal(size=100)
    single = comparisons.delong(y, s).cov[0, 0]
    naive = comparisons.delong(np.r_[y, y], np.r_[s, s]).cov[0, 0]
    clustered = comparisons.delong(np.r_[y, y], np.r_[s, s], groups=np.r_[np.arange(100), np.arange(100)]).cov[0, 0]
    m, n_clusters = y.sum(), 100
    # Obuchowski's small-sample factor I/(I-1) vs DeLong's per-class (m-1)/m, (n-1)/n: within a few percent.
    assert clustered == pytest.approx(single, rel=0.03)
    assert naive < 0.6 * single
    assert m > 0 and n_clusters > 1


def test_delong_needs_both_classes():
    with pytest.raises(ValueError, match="needs positives and negatives"):
        comparisons.delong(np.ones(5), np.arange(5.0))


def _coverage(n_sets, n_boot, seed):
    """Share of patient-bootstrap and DeLong 95% intervals covering the true AUC of a binormal model."""
    rng = np.random.default_rng(seed)
    d = 1.0
    true_auc = sps.norm.cdf(d / np.sqrt(2))
    hits_boot = hits_delong = 0
    for _ in range(n_sets):
        y = rng.integers(0, 2, 150)
        s = rng.normal(size=150) + d * y
        w = bootstrap.bootstrap_weights(np.arange(150), 150, n_boot, rng)
        lo, hi = bootstrap.percentile_interval(weighted.weighted_binary_auc(y, s, w))
        hits_boot += lo <= true_auc <= hi
        res = comparisons.delong(y, s)
        half = 1.959964 * np.sqrt(res.cov[0, 0])
        hits_delong += abs(res.aucs[0] - true_auc) <= half
    return hits_boot / n_sets, hits_delong / n_sets


def test_ci_coverage_1000_datasets():
    """1000 simulated test sets (150 images, true AUC 0.760): 95% intervals must cover 93-97% of the time."""
    boot, delong = _coverage(1000, 500, seed=12)
    assert 0.93 <= boot <= 0.97
    assert 0.93 <= delong <= 0.97


# ------------------------------------------------------------------------------------------------ Holm, format


def test_holm_hand_computed():
    # sorted p: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06 (statsmodels 'holm' agrees)
    out = comparisons.holm([0.01, 0.04, 0.03, 0.005, np.nan])
    np.testing.assert_allclose(out[:4], [0.03, 0.06, 0.06, 0.02])
    assert np.isnan(out[4])
    np.testing.assert_allclose(comparisons.holm([0.5, 0.6]), [1.0, 1.0])
    assert comparisons.holm([]).size == 0


def test_format_ci():
    assert format_ci(0.81234, 0.75, 0.866) == "0.812 [0.750, 0.866]"
    assert format_ci(0.5, np.nan, np.nan) == "0.500"
    assert format_ci(np.nan, 0.1, 0.2) == "n/a"


def test_roc_band_brackets_the_curve(binary_data):
    y, p, pid = binary_data
    w = bootstrap.bootstrap_weights(*bootstrap.patient_codes(pid), 200, np.random.default_rng(0))
    band = bootstrap.roc_band(y, p[:, 1], w)
    fpr, tpr, _ = skm.roc_curve(y, p[:, 1])
    assert np.trapezoid(band["tpr"], band["fpr"]) == pytest.approx(skm.auc(fpr, tpr), abs=0.02)
    assert (band["tpr_low"] <= band["tpr"] + 1e-9).mean() > 0.95
    assert (band["tpr_high"] >= band["tpr"] - 1e-9).mean() > 0.95
