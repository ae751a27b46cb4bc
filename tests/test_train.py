import numpy as np
import pandas as pd
import pytest
import torch

from kneeoa.config import Config
from kneeoa.errors import ConfigError, WeightsNotFoundError
from kneeoa.models.cnn.backbones import BACKBONES, resolve_pretrained
from kneeoa.models.cnn.heads import class_weights
from kneeoa.models.cnn.infer import load_classifier
from kneeoa.runfolder.arms import read_arms
from kneeoa.runfolder.checkpoints import arm_dir
from kneeoa.runfolder.predictions import list_predictions, read_predictions
from kneeoa.stages import evaluate, train


def _cfg(backbone, multitask=True):
    cfg = Config()
    cfg.cnn.backbones = [backbone]
    cfg.cnn.image_size, cfg.cnn.epochs, cfg.cnn.batch_size = 32, 1, 8
    cfg.cnn.multitask, cfg.cnn.pretrained = multitask, "cache"
    return cfg


#: The default backbone trains end to end in the default suite; every other one is checked there by its fast
#: registry contract (tests/test_registry_contracts.py) and trained end to end with `-m slow`.
DEFAULT_BACKBONE = Config().cnn.backbones[0]


@pytest.mark.parametrize("backbone", [pytest.param(b, marks=() if b == DEFAULT_BACKBONE else pytest.mark.slow)
                                      for b in BACKBONES.names()])
def test_short_training_run_writes_checkpoint_predictions_and_record(tiny_run, backbone):
    cfg = _cfg(backbone)
    train.run(tiny_run, cfg)
    tables = {p.name for p in list_predictions(tiny_run)}
    assert tables == {f"{backbone}__{t}.parquet" for t in ("klg", "osteophytes", "jsn", "sclerosis")}
    _, _, klg = read_predictions(tiny_run / "predictions" / f"{backbone}__klg.parquet")
    assert set(klg["split"]) == {"train", "val", "test"} and len(klg) == 24
    rec = read_arms(tiny_run)[backbone]
    assert rec["status"] == "ran" and "random init" in rec["weights"]
    model, layer, pre = load_classifier(arm_dir(tiny_run, backbone), "klg")
    x = pre(np.random.default_rng(0).random((50, 40)).astype(np.float32))
    assert x.shape == (1, 32, 32)
    with torch.no_grad():
        assert model(x[None]).shape == (1, 5)
    assert isinstance(layer, torch.nn.Module)
    layers = BACKBONES.get(backbone).cam_layers
    assert layer is layers["last"](model.net.backbone)  # the default
    model2, finer, _ = load_classifier(arm_dir(tiny_run, backbone), "klg", cam_layer="penultimate")
    assert finer is layers["penultimate"](model2.net.backbone)
    with pytest.raises(ConfigError, match="explain.cam_layer must be one of last, penultimate. Got 'first'"):
        load_classifier(arm_dir(tiny_run, backbone), "klg", cam_layer="first")
    evaluate.run(tiny_run, cfg)
    m = pd.read_csv(tiny_run / "metrics.csv")
    assert list(m.columns) == ["arm", "task", "split", "metric", "value", "ci_low", "ci_high", "n"]
    assert set(m["split"]) == {"val", "test"}
    assert {"kappa_quadratic", "auc"} <= set(m[m["task"] == "klg"]["metric"])


def test_per_task_models(tiny_run):
    cfg = _cfg("resnet18", multitask=False)
    cfg.tasks.names = ["klg", "jsn"]
    train.run(tiny_run, cfg)
    assert sorted(p.name for p in (tiny_run / "checkpoints" / "resnet18").glob("*.pt")) == ["jsn.pt", "klg.pt"]
    load_classifier(arm_dir(tiny_run, "resnet18"), "jsn")
    with pytest.raises(WeightsNotFoundError, match="No checkpoint for arm 'resnet18' and task 'sclerosis'"):
        load_classifier(arm_dir(tiny_run, "resnet18"), "sclerosis")
    with pytest.raises(WeightsNotFoundError, match="No checkpoint for arm 'resnet50' under .*kneeoa train"):
        load_classifier(arm_dir(tiny_run, "resnet50"), "klg")


def test_backbone_args_reach_the_trained_network_its_checkpoint_and_its_package(tiny_run, tmp_path):
    from kneeoa.deploy.package import export_arm, load_model

    cfg = _cfg("twobranch")
    cfg.tasks.names = ["klg"]
    cfg.cnn.image_size, cfg.cnn.backbone_args = 64, {"patch_height": 0.75}
    train.run(tiny_run, cfg)
    assert read_arms(tiny_run)["twobranch"]["details"]["backbone_args"] == {"patch_height": 0.75}
    model, _, _ = load_classifier(arm_dir(tiny_run, "twobranch"), "klg")
    assert model.net.backbone.input_rows(64) == (8, 56)  # the default 0.5 reads rows 16-48
    package = load_model(export_arm(tiny_run, "twobranch", tmp_path / "package"))
    member = package.predictor.groups[0][0]
    assert member.payload["backbone_args"] == {"patch_height": 0.75} and member.net.backbone.patch_height == 0.75


@pytest.mark.parametrize(("backbone", "args", "reason"), [("twobranch", {"widht": 8}, "unexpected keyword"),
                                                          ("twobranch", {"patch_height": 1.5}, "patch_height"),
                                                          ("twobranch", {"pool": "max"}, "pool must be one of"),
                                                          ("resnet18", {"patch_height": 0.4}, "unexpected keyword")])
def test_backbone_args_the_backbone_refuses_are_a_config_error(backbone, args, reason):
    from kneeoa.models.cnn.backbones import create_backbone

    with pytest.raises(ConfigError, match=rf"cnn.backbone_args .* do not fit the backbone {backbone}: .*{reason}"):
        create_backbone(backbone, source=None, args=args)


def test_backbone_args_reach_a_timm_backbone():
    from kneeoa.models.cnn.backbones import create_backbone

    plain, _ = create_backbone("resnet18", source=None)
    dropped, _ = create_backbone("resnet18", source=None, args={"drop_path_rate": 0.1})
    assert not any(type(m).__name__ == "DropPath" for m in plain.modules())
    assert any(type(m).__name__ == "DropPath" for m in dropped.modules())


def test_class_weights_balance_the_loss():
    w = class_weights(np.array([0, 0, 0, 1, -1]), 3).numpy()
    assert w[1] == pytest.approx(3 * w[0])
    assert w[2] == pytest.approx(1.0)  # absent class


def test_class_weight_power_softens_the_balance():
    labels = np.array([0] * 9 + [1] * 3 + [2] + [-1])
    full, root, none = (class_weights(labels, 3, power).numpy() for power in (1.0, 0.5, 0.0))
    assert full[2] / full[0] == pytest.approx(9.0)
    assert root[2] / root[0] == pytest.approx(3.0)
    assert root[1] / root[0] == pytest.approx(3.0 ** 0.5)
    assert none == pytest.approx(np.ones(3))
    for w in (full, root):
        assert w.mean() == pytest.approx(1.0)


def test_explicit_weights_file_must_exist(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="huggingface-cli download timm/resnet18.a1_in1k"):
        resolve_pretrained(BACKBONES.get("resnet18"), "auto", str(tmp_path / "nope.safetensors"))


def test_local_weights_file_is_used(tmp_path):
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    path = tmp_path / "resnet18.safetensors"
    save_file(src.state_dict(), str(path))
    file, text = resolve_pretrained(BACKBONES.get("resnet18"), str(path), None)
    from kneeoa.models.cnn.backbones import create_backbone

    model, err = create_backbone("resnet18", source=file)
    assert err is None and "local file" in text
    # in_chans=1: timm sums the RGB stem filters of the loaded weights
    assert torch.allclose(model.conv1.weight[:, 0], src.conv1.weight.sum(1), atol=1e-5)


def test_learning_rate_anneals_within_the_time_cap():
    from kneeoa.models.cnn.training import TrainingBudget

    now = [0.0]
    by_steps = TrainingBudget(100, None, clock=lambda: now[0])
    assert by_steps.lr_factor(0) == pytest.approx(0.01)
    assert by_steps.lr_factor(15) == pytest.approx(1.0)
    assert by_steps.lr_factor(100) == pytest.approx(0.01)
    capped = TrainingBudget(1000, 10.0, clock=lambda: now[0])
    capped.lr_factor(0)
    now[0] = 600.0  # the 10-minute cap is reached after only 50 of 1000 planned steps
    assert capped.lr_factor(50) == pytest.approx(0.01)
    now[0] = 300.0
    assert 0.4 < capped.lr_factor(50) < 0.7  # halfway through the time budget: mid-decay
    # Before the warm-up share of the time is spent, the clock does not count: slow first steps change nothing.
    early = TrainingBudget(1000, 10.0, clock=lambda: now[0])
    now[0] = 0.0
    early.lr_factor(0)
    now[0] = 60.0  # 10 % of the cap after 10 steps (1 %): by the clock this would be a 10 % schedule
    assert early.lr_factor(10) == pytest.approx(by_steps.lr_factor(1))


def test_logged_train_loss_is_the_epochs_mean_step_loss(tmp_path):
    """`train_loss` is summed per step and logged once per epoch: it must equal the batch-weighted mean of the
    losses the steps returned, epoch by epoch."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from kneeoa.config import CnnCfg
    from kneeoa.models.cnn.backbones import MultiTaskNet, create_backbone
    from kneeoa.models.cnn.training import make_module
    from kneeoa.stages.train import training_loaders
    from kneeoa.transforms.dataset import KneeDataset
    from kneeoa.transforms.preprocess import Preprocess

    hp = CnnCfg(image_size=32, batch_size=5, epochs=2)
    hp.augment = False
    rng = np.random.default_rng(0)
    ds = KneeDataset(rng.integers(0, 256, (13, 32, 32), dtype=np.uint8), np.arange(13), {"klg": rng.integers(0, 5, 13)})
    pre = Preprocess.for_cnn(hp.image_size, 0.5, 0.25, in_chans=1)
    dl, _ = training_loaders(ds, ds, hp, seed=0, pre=pre, hflip=False, channels_last=False)
    torch.manual_seed(0)
    net = MultiTaskNet(create_backbone("twobranch", source=None)[0], {"klg": 5}, {"klg": "ce"})
    module = make_module([net], {"klg": torch.ones(5)}, hp, steps_per_epoch=len(dl))

    class Record(L.Callback):
        def __init__(self) -> None:
            self.steps: list[tuple[float, int]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps.append((float(outputs["loss"]), len(batch[0])))

    rec, logger = Record(), CSVLogger(tmp_path, name="log")
    L.Trainer(max_epochs=2, limit_val_batches=0, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[rec], accelerator="cpu").fit(module, dl)
    logged = pd.read_csv(tmp_path / "log" / "version_0" / "metrics.csv").dropna(subset=["train_loss"])
    per_epoch = len(dl)
    assert per_epoch == 2 and len(rec.steps) == 4  # 13 images in batches of 5, the last partial one dropped
    assert logged["epoch"].tolist() == [0, 1]
    for epoch, value in zip(logged["epoch"], logged["train_loss"], strict=True):
        losses, sizes = zip(*rec.steps[epoch * per_epoch:(epoch + 1) * per_epoch], strict=True)
        assert value == pytest.approx(np.average(losses, weights=sizes), rel=1e-6)
    assert logged["train_loss"].iloc[0] != logged["train_loss"].iloc[1]
