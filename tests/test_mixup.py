import numpy as np
import pytest
import torch

from kneeoa.config import CnnCfg, Config
from kneeoa.models.cnn.mixup import mix_batch


def _batch(n: int = 8):
    """Image i is the constant i and its label is i, so every mixed image shows which two it blends."""
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 4, 4).contiguous()
    return x, {"klg": torch.arange(n)}


def test_without_mixup_the_batch_passes_unchanged():
    x, y = _batch()
    mixed, mates, lam = mix_batch(x, y, 0.0)
    assert mixed is x and mates is None and lam == 1.0


def test_each_image_blends_with_one_mate_whose_labels_come_along_and_the_draws_repeat():
    x, y = _batch()
    torch.manual_seed(3)
    mixed, mates, lam = mix_batch(x.clone(), y, 0.4)
    assert 0.0 < lam < 1.0
    assert sorted(mates["klg"].tolist()) == list(range(8))  # a permutation of the batch
    expected = lam * torch.arange(8.0) + (1 - lam) * mates["klg"].float()
    assert torch.allclose(mixed[:, 0, 0, 0], expected) and torch.all(mixed == mixed[:, :, :1, :1])
    torch.manual_seed(3)
    again, mates2, lam2 = mix_batch(x.clone(), y, 0.4)
    assert lam2 == lam and torch.equal(again, mixed) and torch.equal(mates2["klg"], mates["klg"])


def test_the_training_step_blends_the_losses_against_both_labels():
    """With `cnn.mixup` the step's loss is lam x loss(labels) + (1 - lam) x loss(mates' labels) on the mixed batch."""
    from kneeoa.models.cnn.backbones import MultiTaskNet, create_backbone
    from kneeoa.models.cnn.training import make_module

    hp = CnnCfg(mixup=0.4)
    torch.manual_seed(0)
    net = MultiTaskNet(create_backbone("twobranch", source=None, args={"drop": 0.0})[0], {"klg": 5}, {"klg": "corn"})
    with torch.no_grad():
        net.heads["klg"].weight.mul_(100.0)  # outputs that differ from knee to knee, as a trained network's do
    module = make_module([net.eval()], {"klg": torch.ones(5)}, hp, steps_per_epoch=1)
    x = torch.rand(6, 1, 32, 32)
    y = {"klg": torch.tensor([0, 1, 2, 3, 4, 2])}
    torch.manual_seed(7)
    loss = module.training_step((x, y), 0)
    torch.manual_seed(7)
    mixed, mates, lam = mix_batch(x, y, 0.4)
    with torch.no_grad():
        out = net(mixed)
        own, theirs = module._loss(out, y), module._loss(out, mates)
    assert float(loss) == pytest.approx(float(lam * own + (1 - lam) * theirs), rel=1e-5)
    assert abs(float(theirs) - float(own)) > 0.01  # the mates' labels weigh in: the check above can tell


def test_a_run_with_mixup_trains_another_network_than_one_without(tiny_run):
    """Same seed and data: the option reaches the training loop (on phantom knees)."""
    from kneeoa.models.cnn.infer import load_classifier
    from kneeoa.runfolder.checkpoints import arm_dir
    from kneeoa.stages import train

    weights = {}
    for alpha in (0.0, 0.4):
        cfg = Config()
        cfg.cnn.backbones, cfg.tasks.names = ["twobranch"], ["klg"]
        cfg.cnn.image_size, cfg.cnn.epochs, cfg.cnn.batch_size, cfg.cnn.mixup = 32, 1, 8, alpha
        train.run(tiny_run, cfg)
        model, _, _ = load_classifier(arm_dir(tiny_run, "twobranch"), "klg")
        weights[alpha] = np.concatenate([p.detach().numpy().ravel() for p in model.net.parameters()])
    assert np.all(np.isfinite(weights[0.4])) and not np.allclose(weights[0.0], weights[0.4])
