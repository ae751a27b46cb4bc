import numpy as np
import pytest
from sklearn import metrics as skm

from kneeoa.stats.metrics import METRICS, confusion, metrics_for
from kneeoa.tasks import get_task


def _onehot(pred, k):
    p = np.full((len(pred), k), 0.1 / (k - 1))
    p[np.arange(len(pred)), pred] = 0.9
    return p


def test_binary_hand_computed():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    pred = np.array([1, 1, 0, 0, 0, 0, 1, 1])  # TP=2 FN=1 TN=3 FP=2
    p = _onehot(pred, 2)
    m = {x.name: x.fn(y, p) for x in metrics_for(get_task("jsn"))}
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(3 / 5)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 5) / 2)
    # F1 positive = 2*2/(2*2+1+2) = 4/7; F1 negative = 2*3/(2*3+2+1) = 6/9
    assert m["f1_macro"] == pytest.approx((4 / 7 + 6 / 9) / 2)
    assert "kappa_quadratic" not in m


def test_auc_uses_probabilities():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    probs = np.stack([1 - p1, p1], axis=1)
    assert METRICS.get("auc").fn(y, probs) == pytest.approx(0.75)


def test_quadratic_kappa_hand_computed():
    # 2 classes of 3, observed [[1,1],[0,2]] style case computed by hand via the kappa definition
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    p = _onehot(pred, 3)
    w = np.array([[0, 1, 4], [1, 0, 1], [4, 1, 0]]) / 4
    obs = np.zeros((3, 3))
    for a, b in zip(y, pred, strict=True):
        obs[a, b] += 1
    exp = np.outer(obs.sum(1), obs.sum(0)) / obs.sum()
    want = 1 - (w * obs).sum() / (w * exp).sum()
    assert METRICS.get("kappa_quadratic").fn(y, p) == pytest.approx(want)


@pytest.mark.parametrize("name", ["accuracy", "balanced_accuracy", "f1_macro", "kappa_linear", "kappa_quadratic",
                                  "auc"])
def test_agrees_with_sklearn_on_klg(name):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    probs = rng.dirichlet(np.ones(5), 200)
    probs[np.arange(200), y] += rng.random(200)
    probs /= probs.sum(1, keepdims=True)
    pred = probs.argmax(1)
    ref = {"accuracy": skm.accuracy_score(y, pred), "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
           "f1_macro": skm.f1_score(y, pred, average="macro"),
           "kappa_linear": skm.cohen_kappa_score(y, pred, weights="linear"),
           "kappa_quadratic": skm.cohen_kappa_score(y, pred, weights="quadratic"),
           "auc": skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")}[name]
    assert METRICS.get(name).fn(y, probs) == pytest.approx(ref)


def test_undefined_cases_are_nan():
    y = np.zeros(4, dtype=int)
    p = _onehot(np.array([0, 1, 0, 0]), 2)
    assert np.isnan(METRICS.get("auc").fn(y, p))
    assert np.isnan(METRICS.get("sensitivity").fn(y, p))


def test_confusion_has_all_classes():
    cm = confusion(np.array([0, 4]), _onehot(np.array([0, 3]), 5))
    assert cm.shape == (5, 5) and cm[4, 3] == 1 and cm.sum() == 2


@pytest.mark.parametrize("task", ["jsn", "klg"])
def test_each_metric_orders_good_and_bad_predictions_as_its_entry_says(task):
    """`higher_is_better` is a fact about the function: perfect predictions beat reversed ones in that direction."""
    rng = np.random.default_rng(1)
    k = get_task(task).n_classes
    y = np.tile(np.arange(k), 20)
    rng.shuffle(y)
    perfect, reversed_ = _onehot(y, k), _onehot(k - 1 - y, k)
    for m in metrics_for(get_task(task)):
        good, bad = m.fn(y, perfect), m.fn(y, reversed_)
        assert good != bad, m.name
        assert (good > bad) == m.higher_is_better, f"{m.name}: perfect {good}, reversed {bad}"


def test_every_metric_has_its_weighted_form_next_to_it():
    """One registry: the bootstrap takes the weighted form from the metric's own entry, and it agrees with it."""
    rng = np.random.default_rng(2)
    y = np.tile(np.arange(5), 10)
    probs = rng.dirichlet(np.ones(5), len(y))
    for m in metrics_for(get_task("klg")):
        assert m.weighted is not None, m.name
        assert m.weighted_fn(y, probs, np.ones((1, len(y))))[0] == pytest.approx(m.fn(y, probs), abs=1e-12), m.name
