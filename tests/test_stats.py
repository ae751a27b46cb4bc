"""Patient bootstrap, DeLong, Holm and the stats stage."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from sklearn import metrics as skm

from kneeoa import stats
from kneeoa.config import Config
from kneeoa.data.manifest import write_manifest
from kneeoa.errors import ConfigError, ManifestError
from kneeoa.metrics import METRICS, metrics_for
from kneeoa.predictions import make_prediction_table, write_predictions
from kneeoa.tasks import get_task


def _probs(rng, y, k, signal=1.5):
    logits = rng.normal(size=(len(y), k))
    logits[np.arange(len(y)), y] += signal
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def binary_data():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 120)
    return y, _probs(rng, y, 2), np.repeat(np.arange(60), 2)


@pytest.fixture
def ordinal_data():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, 150)
    return y, _probs(rng, y, 5), np.repeat(np.arange(50), 3)


# ------------------------------------------------------------------------------------------------ resampling


def test_patient_weights_move_a_patients_images_together():
    codes = np.array([0, 0, 1, 2, 2, 2])
    w = stats.bootstrap_weights(codes, 3, 50, np.random.default_rng(0))
    assert w.shape == (50, 6)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 5]).all()
    # each resample draws 3 patients: weights summed over one image per patient give 3
    assert (w[:, [0, 2, 3]].sum(axis=1) == 3).all()
    again = stats.bootstrap_weights(codes, 3, 50, np.random.default_rng(0))
    assert (w == again).all()


def test_patient_codes_group_by_id():
    codes, n = stats.patient_codes(["b", "a", "b", "c"])
    assert n == 3 and codes[0] == codes[2] and len(set(codes)) == 3


@pytest.mark.parametrize("n_boot", [0, -5])
def test_bad_n_boot_raises(n_boot):
    with pytest.raises(ConfigError, match="n_boot must be a positive"):
        stats.bootstrap_weights(np.zeros(3, int), 1, n_boot, np.random.default_rng(0))


def test_bad_confidence_raises():
    with pytest.raises(ConfigError, match="confidence must be between 0 and 1"):
        stats.percentile_interval(np.arange(10.0), 1.5)


def test_percentile_interval_ignores_nan():
    lo, hi = stats.percentile_interval(np.r_[np.arange(101.0), np.nan], 0.9)
    assert (lo, hi) == pytest.approx((5.0, 95.0))
    assert np.isnan(stats.percentile_interval(np.array([np.nan]))).all()


# ------------------------------------------------------------------------------------------------ weighted metrics


@pytest.mark.parametrize("task", ["osteophytes", "klg"])
def test_weighted_forms_equal_point_and_bruteforce(task, binary_data, ordinal_data):
    y, probs, pid = binary_data if task != "klg" else ordinal_data
    codes, n_pat = stats.patient_codes(pid)
    w = stats.bootstrap_weights(codes, n_pat, 25, np.random.default_rng(3))
    for m in metrics_for(get_task(task)):
        fast = stats.weighted_metric(m.name)
        assert fast(y, probs, np.ones((1, len(y))))[0] == pytest.approx(m.fn(y, probs), abs=1e-12), m.name
        np.testing.assert_allclose(fast(y, probs, w), stats.resampled(m.fn)(y, probs, w), atol=1e-12,
                                   err_msg=m.name)


def test_every_registered_metric_has_a_vectorised_form():
    assert set(METRICS.names()) <= set(stats.WEIGHTED.names())


def test_weighted_auc_handles_ties_like_sklearn():
    y = np.array([0, 1, 0, 1, 1, 0, 0])
    s = np.array([0.5, 0.5, 0.2, 0.9, 0.5, 0.9, 0.1])
    assert stats.weighted_binary_auc(y, s, np.ones((1, 7)))[0] == pytest.approx(skm.roc_auc_score(y, s))


def test_bootstrap_point_estimates_equal_sklearn(binary_data, ordinal_data):
    w_of = lambda pid: stats.bootstrap_weights(*stats.patient_codes(pid), 100, np.random.default_rng(0))  # noqa: E731
    y, p, pid = binary_data
    w = w_of(pid)
    expected = {"auc": skm.roc_auc_score(y, p[:, 1]), "accuracy": skm.accuracy_score(y, p.argmax(1)),
                "balanced_accuracy": skm.balanced_accuracy_score(y, p.argmax(1))}
    for name, value in expected.items():
        ci = stats.bootstrap_ci(y, p, w, point=METRICS.get(name).fn, weighted=stats.weighted_metric(name))
        assert ci.value == pytest.approx(value, abs=1e-12)
        assert ci.low <= ci.value <= ci.high
    y, p, pid = ordinal_data
    ci = stats.bootstrap_ci(y, p, w_of(pid), point=METRICS.get("kappa_quadratic").fn,
                            weighted=stats.weighted_metric("kappa_quadratic"))
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
    res = stats.delong(y, score)
    assert res.aucs[0] == pytest.approx(0.893, abs=5e-4)
    assert np.sqrt(res.cov[0, 0]) == pytest.approx(0.032, abs=1.5e-3)


def test_fast_delong_equals_definition():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 80)
    scores = np.vstack([y + rng.normal(size=80), np.round(y * 0.5 + rng.normal(size=80), 1)])
    res = stats.delong(y, scores)
    aucs, cov = _bruteforce_delong(y, scores)
    np.testing.assert_allclose(res.aucs, aucs, atol=1e-12)
    np.testing.assert_allclose(res.cov, cov, atol=1e-12)
    np.testing.assert_allclose(res.aucs, [skm.roc_auc_score(y, s) for s in scores], atol=1e-12)
    test = stats.delong_test(y, scores[0], scores[1])
    z = (aucs[0] - aucs[1]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert test.p_value == pytest.approx(2 * sps.norm.sf(abs(z)))
    assert test.low < test.difference < test.high


def test_clustered_delong_does_not_count_duplicate_knees_twice():
    """Each patient imaged twice identically: the clustered variance matches one image per patient."""
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 100)
    s = y + rng.normal(size=100)
    single = stats.delong(y, s).cov[0, 0]
    naive = stats.delong(np.r_[y, y], np.r_[s, s]).cov[0, 0]
    clustered = stats.delong(np.r_[y, y], np.r_[s, s], groups=np.r_[np.arange(100), np.arange(100)]).cov[0, 0]
    m, n_clusters = y.sum(), 100
    # Obuchowski's small-sample factor I/(I-1) vs DeLong's per-class (m-1)/m, (n-1)/n: within a few percent.
    assert clustered == pytest.approx(single, rel=0.03)
    assert naive < 0.6 * single
    assert m > 0 and n_clusters > 1


def test_delong_needs_both_classes():
    with pytest.raises(ValueError, match="needs positives and negatives"):
        stats.delong(np.ones(5), np.arange(5.0))


def _coverage(n_sets, n_boot, seed):
    """Share of patient-bootstrap and DeLong 95% intervals covering the true AUC of a binormal model."""
    rng = np.random.default_rng(seed)
    d = 1.0
    true_auc = sps.norm.cdf(d / np.sqrt(2))
    hits_boot = hits_delong = 0
    for _ in range(n_sets):
        y = rng.integers(0, 2, 150)
        s = rng.normal(size=150) + d * y
        w = stats.bootstrap_weights(np.arange(150), 150, n_boot, rng)
        lo, hi = stats.percentile_interval(stats.weighted_binary_auc(y, s, w))
        hits_boot += lo <= true_auc <= hi
        res = stats.delong(y, s)
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
    out = stats.holm([0.01, 0.04, 0.03, 0.005, np.nan])
    np.testing.assert_allclose(out[:4], [0.03, 0.06, 0.06, 0.02])
    assert np.isnan(out[4])
    np.testing.assert_allclose(stats.holm([0.5, 0.6]), [1.0, 1.0])
    assert stats.holm([]).size == 0


def test_format_ci():
    assert stats.format_ci(0.81234, 0.75, 0.866) == "0.812 [0.750, 0.866]"
    assert stats.format_ci(0.5, np.nan, np.nan) == "0.500"
    assert stats.format_ci(np.nan, 0.1, 0.2) == "n/a"


def test_roc_band_brackets_the_curve(binary_data):
    y, p, pid = binary_data
    w = stats.bootstrap_weights(*stats.patient_codes(pid), 200, np.random.default_rng(0))
    band = stats.roc_band(y, p[:, 1], w)
    fpr, tpr, _ = skm.roc_curve(y, p[:, 1])
    assert np.trapezoid(band["tpr"], band["fpr"]) == pytest.approx(skm.auc(fpr, tpr), abs=0.02)
    assert (band["tpr_low"] <= band["tpr"] + 1e-9).mean() > 0.95
    assert (band["tpr_high"] >= band["tpr"] - 1e-9).mean() > 0.95


# ------------------------------------------------------------------------------------------------ the stage


def make_run(run_dir, arms, *, n_patients=40, seed=0, tasks=("osteophytes", "klg")):
    """A tiny run folder: manifest (2 knees per patient), predictions per arm x task, metrics.csv from evaluate."""
    rng = np.random.default_rng(seed)
    n = 2 * n_patients
    pid = np.repeat([f"P{i:03d}" for i in range(n_patients)], 2)
    split = np.where(np.arange(n) < n // 2, "val", "test")
    manifest = pd.DataFrame({
        "image_id": [f"{p}_{s}" for p, s in zip(pid, "RL" * n_patients, strict=True)], "patient_id": pid, "visit": 0,
        "side": list("RL" * n_patients), "image_path": [f"crops/{i}.png" for i in range(n)], "split": split,
        "low_quality": False, "source": "phantom", "klg": rng.integers(0, 5, n)})
    manifest["osteophytes"] = (manifest["klg"] >= 2).astype(int)
    write_manifest(manifest, run_dir)
    rows = []
    for a, arm in enumerate(arms):
        for task in tasks:
            y = manifest[task].to_numpy()
            probs = _probs(rng, y, get_task(task).n_classes, signal=1.0 + a)
            write_predictions(make_prediction_table(manifest["image_id"], split, y, probs), run_dir, arm, task)
            for sp in ("val", "test"):
                m = split == sp
                for metric in metrics_for(get_task(task)):
                    rows.append({"arm": arm, "task": task, "split": sp, "metric": metric.name,
                                 "value": metric.fn(y[m], probs[m]), "ci_low": np.nan, "ci_high": np.nan,
                                 "n": int(m.sum())})
    pd.DataFrame(rows).to_csv(run_dir / "metrics.csv", index=False)
    return manifest


def _cfg(n_boot=200):
    cfg = Config()
    cfg.stats.n_boot = n_boot
    return cfg


def test_stats_stage_two_arms(tmp_path):
    from kneeoa.stages import stats as stage

    make_run(tmp_path, ["resnet18", "raddino_xgb"])
    before = pd.read_csv(tmp_path / "metrics.csv")
    stage.run(tmp_path, _cfg())
    after = pd.read_csv(tmp_path / "metrics.csv")
    kept = after[~after["metric"].isin(["ece", "brier"])]
    assert len(kept) == len(before)
    np.testing.assert_allclose(kept["value"], before["value"])  # point estimates untouched
    defined = kept[kept["value"].notna()]
    assert defined["ci_low"].notna().all() and (defined["ci_low"] <= defined["value"] + 1e-12).all()
    assert (defined["ci_high"] >= defined["value"] - 1e-12).all()
    calib = after[after["metric"].isin(["ece", "brier"])]
    assert len(calib) == 2 * 2 * 2 * 2  # arms x tasks x splits x metrics
    assert calib["ci_low"].notna().all()
    comp = pd.read_csv(tmp_path / "comparisons.csv")
    assert set(comp["metric"]) == {"auc", "accuracy", "balanced_accuracy", "kappa_quadratic"}
    assert (comp.loc[(comp["task"] == "osteophytes") & (comp["metric"] == "auc"), "method"] == "DeLong").all()
    assert (comp["p_holm"] >= comp["p_value"] - 1e-12).all()
    assert (comp["n_images"] == 40).all() and (comp["n_patients"] == 20).all()
    assert {"fpr", "tpr_low"} <= set(pd.read_csv(tmp_path / "roc_bands.csv").columns)
    rel = pd.read_csv(tmp_path / "reliability.csv")
    assert (rel.groupby(["arm", "task", "split"])["n"].sum() == 40).all()
    # re-running is deterministic and does not duplicate the calibration rows
    stage.run(tmp_path, _cfg())
    again = pd.read_csv(tmp_path / "metrics.csv")
    pd.testing.assert_frame_equal(again, after)


def test_stats_stage_one_arm_writes_empty_comparisons(tmp_path):
    from kneeoa.stages import stats as stage

    make_run(tmp_path, ["resnet18"], tasks=("osteophytes",))
    stage.run(tmp_path, _cfg(50))
    comp = pd.read_csv(tmp_path / "comparisons.csv")
    assert len(comp) == 0 and list(comp.columns) == stage.COMPARISON_COLUMNS


def test_stats_stage_without_metrics_says_run_evaluate(tmp_path):
    from kneeoa.stages import stats as stage

    make_run(tmp_path, ["resnet18"], tasks=("osteophytes",))
    (tmp_path / "metrics.csv").unlink()
    with pytest.raises(FileNotFoundError, match="kneeoa evaluate"):
        stage.run(tmp_path, _cfg(10))


def test_stats_stage_unknown_image_is_named(tmp_path):
    from kneeoa.stages import stats as stage

    manifest = make_run(tmp_path, ["resnet18"], tasks=("osteophytes",))
    manifest = manifest.iloc[1:]
    write_manifest(manifest, tmp_path)
    with pytest.raises(ManifestError, match="P000_R.*not in the manifest"):
        stage.run(tmp_path, _cfg(10))


def test_stats_stage_metrics_csv_missing_columns(tmp_path):
    from kneeoa.stages import stats as stage

    make_run(tmp_path, ["resnet18"], tasks=("osteophytes",))
    pd.DataFrame({"arm": ["x"], "value": [1.0]}).to_csv(tmp_path / "metrics.csv", index=False)
    with pytest.raises(ManifestError, match="missing column"):
        stage.run(tmp_path, _cfg(10))


@pytest.mark.slow
def test_stats_stage_speed_1000_resamples(tmp_path):
    """1000 resamples x 4 arms x 2 tasks x 2 splits (~300 images per split) in under 30 s on one core."""
    from kneeoa.stages import stats as stage

    make_run(tmp_path, ["a", "b", "c", "d"], n_patients=300)
    start = time.perf_counter()
    stage.run(tmp_path, _cfg(1000))
    assert time.perf_counter() - start < 30
