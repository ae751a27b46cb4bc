import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score

from kneeoa.models.cnn.heads import (
    HEADS,
    apply_cutpoints,
    corn_loss,
    corn_probs,
    decode,
    expected_grade,
    tune_cutpoints,
)


@pytest.mark.parametrize("name", HEADS.names())
def test_every_head_gives_distributions_and_a_finite_loss_with_gradients(name):
    head = HEADS.get(name)
    out = torch.randn(16, head.n_outputs(5), requires_grad=True)
    probs = head.probs(out, 5)
    assert probs.shape == (16, 5)
    assert torch.allclose(probs.sum(1), torch.ones(16), atol=1e-5) and (probs >= 0).all()
    y = torch.tensor([0, 1, 2, 3, 4, -1] * 2 + [2, 2, 1, 0])
    loss = head.loss(out, y, torch.ones(5), 0.0)
    loss.backward()
    assert torch.isfinite(loss) and out.grad.abs().sum() > 0
    assert out.grad[5].abs().sum() == 0  # the missing label contributes nothing


def test_corn_probs_follow_the_chain_rule():
    out = torch.tensor([[2.0, 0.0, -1.0, -3.0]])
    s = torch.sigmoid(out[0])
    exceed = [s[0], s[0] * s[1], s[0] * s[1] * s[2], s[0] * s[1] * s[2] * s[3]]
    expect = torch.stack([1 - exceed[0], exceed[0] - exceed[1], exceed[1] - exceed[2], exceed[2] - exceed[3],
                          exceed[3]])
    assert torch.allclose(corn_probs(out)[0], expect, atol=1e-6)


def test_corn_loss_matches_its_definition():
    """Brute force: for each threshold k, BCE of y > k over the images with y >= k, averaged over all such pairs."""
    torch.manual_seed(0)
    out, y = torch.randn(7, 4), torch.tensor([0, 1, 2, 3, 4, 2, 1])
    terms = []
    for i in range(7):
        for k in range(4):
            if y[i] >= k:
                target = torch.tensor(float(y[i] > k))
                terms.append(torch.nn.functional.binary_cross_entropy_with_logits(out[i, k], target))
    assert torch.isclose(corn_loss(out, y, torch.ones(5)), torch.stack(terms).mean(), atol=1e-6)


def test_ordinal_heads_learn_an_ordered_toy_problem():
    """A 1-d feature that sets the grade: CORN and regression reach high kappa, so the losses point the right way."""
    torch.manual_seed(0)
    x = torch.rand(400, 1) * 5
    y = x[:, 0].floor().long().clamp(max=4)
    for name in ("corn", "regression", "ce"):
        head = HEADS.get(name)
        lin = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(), torch.nn.Linear(16, head.n_outputs(5)))
        opt = torch.optim.Adam(lin.parameters(), lr=0.03)
        for _ in range(300):
            opt.zero_grad()
            head.loss(lin(x), y, torch.ones(5), 0.0).backward()
            opt.step()
        pred = decode(head.probs(lin(x), 5).detach().numpy(), {"method": "cutpoints",
                                                                 "cuts": [0.5, 1.5, 2.5, 3.5]})
        assert cohen_kappa_score(y.numpy(), pred, weights="quadratic") > 0.9, name


def test_cutpoints_apply_and_tuning_never_lowers_kappa():
    probs = np.eye(5)[[0, 1, 2, 3, 4]]
    assert expected_grade(probs).tolist() == [0, 1, 2, 3, 4]
    assert apply_cutpoints(probs, [0.5, 1.5, 2.5, 3.5]).tolist() == [0, 1, 2, 3, 4]
    assert apply_cutpoints(probs, [1.5, 1.6, 2.5, 3.5]).tolist() == [0, 0, 2, 3, 4]
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    # A biased model: the expected grade is shifted up by 0.8, so midpoint cuts over-grade.
    score = np.clip(y + 0.8 + rng.normal(0, 0.5, 300), 0, 4)
    probs = np.stack([np.exp(-((np.arange(5) - s) ** 2) / 0.5) for s in score])
    probs /= probs.sum(1, keepdims=True)
    midpoint = cohen_kappa_score(y, apply_cutpoints(probs, [0.5, 1.5, 2.5, 3.5]), weights="quadratic")
    cuts = tune_cutpoints(y, probs)
    tuned = cohen_kappa_score(y, apply_cutpoints(probs, cuts), weights="quadratic")
    assert list(cuts) == sorted(cuts) and tuned >= midpoint and tuned > 0.8
    assert tune_cutpoints(y, probs) == cuts  # deterministic


def _biased_model(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Grades and probabilities of a model whose expected grade is shifted up by 0.8 (midpoint cuts over-grade)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    score = np.clip(y + 0.8 + rng.normal(0, 0.6, n), 0, 4)
    probs = np.exp(-((np.arange(5)[None, :] - score[:, None]) ** 2) / 0.5)
    return y, probs / probs.sum(1, keepdims=True)


def test_bagged_cutpoints_resample_whole_patients_and_vary_less_between_samples():
    y, probs = _biased_model(240, 1)
    patients = np.arange(240) // 2  # two knees a patient
    bagged = tune_cutpoints(y, probs, groups=patients, n_boot=15)
    assert bagged == sorted(bagged) and bagged == tune_cutpoints(y, probs, groups=patients, n_boot=15)
    # One patient holding every knee: each resample is the whole set, so the median is the plain search.
    assert tune_cutpoints(y, probs, groups=np.zeros(240), n_boot=3) == tune_cutpoints(y, probs)
    # Tuned on six different samples of knees, the bagged cut-points move less than the plain ones.
    plain, bag = [], []
    for seed in range(6):
        ys, ps = _biased_model(120, 10 + seed)
        plain.append(tune_cutpoints(ys, ps))
        bag.append(tune_cutpoints(ys, ps, groups=np.arange(120), n_boot=15))
    assert np.std(bag, axis=0).sum() < np.std(plain, axis=0).sum()


def test_accuracy_weight_trades_some_kappa_for_accuracy():
    # KL-like grades: many KL0, a noisy model. Kappa alone tolerates near misses that cost accuracy.
    rng = np.random.default_rng(1)
    y = rng.choice(5, 400, p=[0.4, 0.18, 0.26, 0.13, 0.03])
    score = np.clip(y + rng.normal(0, 0.8, 400), 0, 4)
    probs = np.exp(-((np.arange(5)[None, :] - score[:, None]) ** 2) / 0.5)
    probs /= probs.sum(1, keepdims=True)
    kappa_only = apply_cutpoints(probs, tune_cutpoints(y, probs))
    weighted = apply_cutpoints(probs, tune_cutpoints(y, probs, accuracy_weight=1.0))
    kappa = lambda pred: cohen_kappa_score(y, pred, weights="quadratic")  # noqa: E731
    assert np.mean(weighted == y) > np.mean(kappa_only == y) + 0.02
    assert kappa(kappa_only) - 0.03 < kappa(weighted) < kappa(kappa_only)


def test_decode_rejects_unknown_methods():
    assert decode(np.eye(3), None).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="Unknown decoding method 'median'"):
        decode(np.eye(3), {"method": "median"})
