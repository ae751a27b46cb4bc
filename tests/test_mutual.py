import json

import numpy as np
import pytest
import torch

from kneeoa.config import CnnCfg, Config
from kneeoa.errors import ConfigError
from kneeoa.models.cnn.backbones import MultiTaskNet, create_backbone
from kneeoa.models.cnn.mutual import mutual_loss
from kneeoa.models.cnn.training import make_module


def _kl(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return (q * (q.log() - p.log())).sum(-1).mean()


def test_the_term_is_each_networks_kl_from_the_others_mean():
    torch.manual_seed(0)
    p = [torch.softmax(torch.randn(6, 5), -1) for _ in range(3)]
    expected = sum(_kl((p[(i + 1) % 3] + p[(i + 2) % 3]) / 2, p[i]) for i in range(3))
    got = mutual_loss([{"klg": x} for x in p])
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    assert float(got) > 0.01
    assert float(mutual_loss([{"klg": p[0]}, {"klg": p[0].clone()}])) == pytest.approx(0.0, abs=1e-7)
    assert float(mutual_loss([{"klg": p[0]}])) == 0.0  # one network has no one to learn from


def test_each_network_learns_from_the_other_and_not_through_it():
    """The gradient that reaches network A's logits is that of KL(p_B || p_A) with p_B held fixed."""
    torch.manual_seed(1)
    a, b = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    mutual_loss([{"klg": torch.softmax(a, -1)}, {"klg": torch.softmax(b, -1)}]).backward()
    a2 = a.detach().clone().requires_grad_(True)
    _kl(torch.softmax(b, -1).detach(), torch.softmax(a2, -1)).backward()
    assert torch.allclose(a.grad, a2.grad, atol=1e-6)


def test_a_grade_with_zero_probability_gives_a_finite_term():
    """CORN's class probabilities can be exactly 0 for a grade: the term stays finite and so do its gradients."""
    p = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)
    q = torch.tensor([[0.5, 0.5, 0.0]], requires_grad=True)
    loss = mutual_loss([{"klg": p}, {"klg": q}])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()


def _net(seed: int) -> MultiTaskNet:
    torch.manual_seed(seed)
    net = MultiTaskNet(create_backbone("twobranch", source=None, args={"drop": 0.0})[0], {"klg": 5}, {"klg": "corn"})
    with torch.no_grad():
        net.heads["klg"].weight.mul_(100.0)  # outputs that differ from knee to knee, as a trained network's do
    return net.eval()


def test_the_training_step_adds_the_weighted_term_to_both_networks_losses():
    nets = [_net(0), _net(1)]
    module = make_module(nets, {"klg": torch.ones(5)}, CnnCfg(mutual=0.5), steps_per_epoch=1)
    x, y = torch.rand(6, 1, 32, 32), {"klg": torch.tensor([0, 1, 2, 3, 4, 2])}
    loss = module.training_step((x, y), 0)
    with torch.no_grad():
        outs = [n(x) for n in nets]
        own = sum(module._loss(o, y) for o in outs)
        term = mutual_loss([n.probs(o) for n, o in zip(nets, outs, strict=True)])
    assert float(term) > 0.01  # the networks disagree: the check below can tell the term is in
    assert float(loss) == pytest.approx(float(own + 0.5 * term), rel=1e-5)


def test_a_cohort_of_one_gives_the_step_and_val_score_of_the_network_alone():
    """`cnn.mutual` without a second network changes nothing: the loss is the network's own."""
    net = _net(0)
    module = make_module([net], {"klg": torch.ones(5)}, CnnCfg(mutual=1.0), steps_per_epoch=1)
    x, y = torch.rand(6, 1, 32, 32), {"klg": torch.tensor([0, 1, 2, 3, 4, 2])}
    with torch.no_grad():
        assert float(module.training_step((x, y), 0)) == float(module._loss(net(x), y))


def test_seeds_trained_together_without_the_term_get_each_their_own_gradient():
    """`cnn.together` alone only shares the batches: each network's gradient is the one it gets alone on that batch."""
    import copy

    a, b = _net(0), _net(1)
    alone = copy.deepcopy(a)
    x, y = torch.rand(6, 1, 32, 32), {"klg": torch.tensor([0, 1, 2, 3, 4, 2])}
    make_module([alone], {"klg": torch.ones(5)}, CnnCfg(), steps_per_epoch=1).training_step((x, y), 0).backward()
    for mutual, same in ((0.0, True), (1.0, False)):  # the term changes them: the comparison can tell
        a.zero_grad(), b.zero_grad()
        cohort = make_module([a, b], {"klg": torch.ones(5)}, CnnCfg(together=True, mutual=mutual), steps_per_epoch=1)
        cohort.training_step((x, y), 0).backward()
        grads = zip(a.parameters(), alone.parameters(), strict=True)
        assert all(torch.allclose(p.grad, q.grad, atol=1e-7) for p, q in grads) == same


def test_the_time_cap_is_per_network():
    """`cnn.max_minutes` caps each network: a cohort of two that trains in one loop gets twice the minutes."""
    hp = CnnCfg(together=True, max_minutes=2.0)
    for nets, seconds in (([_net(0)], 120), ([_net(0), _net(1)], 240)):
        module = make_module(nets, {"klg": torch.ones(5)}, hp, steps_per_epoch=1)
        module.configure_optimizers()
        assert module.budget.max_seconds == seconds


@pytest.mark.parametrize(("together", "mutual"), [(True, 0.0), (False, 1.0)])
def test_a_run_with_seeds_together_trains_them_in_one_loop(tiny_run, together, mutual):
    """On phantom knees: one cohort folder for both seeds, each member keeps its seed and records the cohort, the
    ensemble arm averages two different networks, and the weights differ from the same seeds trained apart."""
    from kneeoa.models.cnn.infer import read_members
    from kneeoa.runfolder.checkpoints import arm_dir
    from kneeoa.stages import train

    weights = {}
    for key, settings in {"apart": (False, 0.0), "together": (together, mutual)}.items():
        cfg = Config()
        cfg.cnn.backbones, cfg.tasks.names = ["twobranch"], ["klg"]
        cfg.cnn.image_size, cfg.cnn.epochs, cfg.cnn.batch_size = 32, 1, 8
        cfg.cnn.ensemble_seeds, (cfg.cnn.together, cfg.cnn.mutual) = 2, settings
        train.run(tiny_run, cfg)
        members = read_members(next(arm_dir(tiny_run, "twobranch_ens").glob("*.pt")))
        weights[key] = [np.concatenate([v.numpy().ravel() for v in m["state_dict"].values()]) for m in members]
    lightning = tiny_run / "checkpoints" / "twobranch" / "lightning"
    assert (lightning / "multitask-seeds0-1").is_dir()
    record = json.loads((tiny_run / "arms" / "twobranch_ens.json").read_text())
    extras = record["details"]["members"]["multitask"]
    assert [e["seed"] for e in extras] == [0, 1]
    assert all(e["cohort"] == [0, 1] and e["mutual"] == mutual for e in extras)
    assert not np.allclose(weights["together"][0], weights["together"][1])  # two networks, not one copied
    for apart, joint in zip(weights["apart"], weights["together"], strict=True):
        assert np.all(np.isfinite(joint)) and not np.allclose(apart, joint)


def test_mutual_learning_without_a_second_seed_is_refused():
    from kneeoa.config_checks import validate_config

    cfg = Config()
    cfg.cnn.mutual = 1.0
    cfg.cnn.backbones = ["twobranch"]
    with pytest.raises(ConfigError, match="cnn.mutual: 1.0 for twobranch needs cnn.ensemble_seeds of 2 or more"):
        validate_config(cfg)
    cfg.cnn.ensemble_seeds = 2
    validate_config(cfg)
    cfg.cnn.mutual = -0.5
    with pytest.raises(ConfigError, match="cnn.mutual: -0.5 is outside"):
        validate_config(cfg)
