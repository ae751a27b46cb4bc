"""The real-data KL recipe on tiny runs: ordinal heads, tuned cut-points, mirroring, sampling, EMA, TTA, ensembles."""

import numpy as np
import pytest
import torch

from kneeoa.config import Config
from kneeoa.errors import ConfigError
from kneeoa.models.cnn.epoch_weights import read_epoch_weights
from kneeoa.models.cnn.infer import CnnPredictor, read_members
from kneeoa.runfolder.arms import read_arms
from kneeoa.runfolder.checkpoints import arm_dir
from kneeoa.runfolder.predictions import read_predictions
from kneeoa.sources.manifest import load_knee, read_manifest, write_manifest
from kneeoa.stages import train
from kneeoa.transforms.cache import image_cache
from kneeoa.transforms.preprocess import Preprocess


def _cfg(**cnn):
    cfg = Config()
    cfg.tasks.names = ["klg", "jsn"]
    cfg.cnn.backbones = ["twobranch"]
    cfg.cnn.image_size, cfg.cnn.epochs, cfg.cnn.batch_size, cfg.cnn.pretrained = 32, 2, 8, "none"
    for k, v in cnn.items():
        setattr(cfg.cnn, k, v)
    return cfg


def _mirror(run_dir):
    m = read_manifest(run_dir)
    m["mirrored"] = m["side"] == "L"
    write_manifest(m, run_dir)
    return m


def test_corn_head_with_cutpoints_stores_the_decoding_and_predict_reproduces_the_tables(tiny_run):
    manifest = _mirror(tiny_run)
    train.run(tiny_run, _cfg(klg_head="corn", klg_decode="cutpoints", ema=0.9, class_balance="balanced_sampling"))
    (payload,) = read_members(tiny_run / "checkpoints" / "twobranch" / "multitask.pt")
    assert payload["heads"] == {"klg": "corn", "jsn": "ce"}
    assert payload["decoding"]["klg"]["method"] == "cutpoints" and len(payload["decoding"]["klg"]["cuts"]) == 4
    assert payload["decoding"]["jsn"] == {"method": "argmax"}
    assert payload["preprocess"]["mirror_left"] is True
    _, _, table = read_predictions(tiny_run / "predictions" / "twobranch__klg.parquet")
    predictor = CnnPredictor.from_folder(arm_dir(tiny_run, "twobranch"))
    rows = manifest.set_index("image_id").loc[table["image_id"]].reset_index()
    images = [load_knee(tiny_run, r) for r in rows.to_dict("records")]
    probs = predictor.predict_proba(images)["klg"]
    assert np.abs(probs - table[[f"prob_{k}" for k in range(5)]].to_numpy()).max() < 1e-5
    assert (predictor.decode("klg", probs) == table["y_pred"].to_numpy()).all()
    rec = read_arms(tiny_run)["twobranch"]
    assert rec["details"]["head"] == "corn" and rec["details"]["decoding"]["klg"]["method"] == "cutpoints"


def test_cutpoints_and_checkpoint_are_fixed_before_test_is_read(tiny_run):
    """Scrambling the test labels changes nothing the run chose: same cut-points, same test predictions."""
    m = read_manifest(tiny_run)
    cfg = _cfg(klg_head="regression", klg_decode="cutpoints", cutpoint_bootstrap=5, epochs=1)
    cfg.tasks.names = ["klg"]
    train.run(tiny_run, cfg)
    first = read_members(tiny_run / "checkpoints" / "twobranch" / "multitask.pt")[0]
    _, _, before = read_predictions(tiny_run / "predictions" / "twobranch__klg.parquet")
    test = m["split"] == "test"
    m.loc[test, "klg"] = (4 - m.loc[test, "klg"]).astype("Int64")
    write_manifest(m, tiny_run)
    train.run(tiny_run, cfg)
    second = read_members(tiny_run / "checkpoints" / "twobranch" / "multitask.pt")[0]
    _, _, after = read_predictions(tiny_run / "predictions" / "twobranch__klg.parquet")
    assert first["decoding"] == second["decoding"]
    for k, v in first["state_dict"].items():
        assert torch.equal(v, second["state_dict"][k]), k
    b, a = before[before["split"] == "test"], after[after["split"] == "test"]
    assert (b["y_pred"].to_numpy() == a["y_pred"].to_numpy()).all()
    assert (b["y_true"].to_numpy() != a["y_true"].to_numpy()).any()  # the labels really changed


def test_ensemble_arm_averages_its_seeds_and_tta_changes_the_probabilities(tiny_run):
    cfg = _cfg(ensemble_seeds=2, tta=True, epochs=1)
    cfg.tasks.names = ["klg"]
    train.run(tiny_run, cfg)
    arms = read_arms(tiny_run)
    assert {"twobranch", "twobranch_ens"} <= set(arms)
    members = read_members(tiny_run / "checkpoints" / "twobranch_ens" / "multitask.pt")
    assert [m["extra"]["seed"] for m in members] == [0, 1]
    manifest = read_manifest(tiny_run)
    images = image_cache(tiny_run, manifest, 32)
    single = [CnnPredictor.from_payloads([m]).predict_uint8(images)["klg"] for m in members]
    _, _, ens = read_predictions(tiny_run / "predictions" / "twobranch_ens__klg.parquet")
    assert np.abs(ens[[f"prob_{k}" for k in range(5)]].to_numpy() - (single[0] + single[1]) / 2).max() < 1e-6
    no_tta = CnnPredictor.from_payloads([{**members[0], "preprocess": {**members[0]["preprocess"], "tta": False}}])
    assert np.abs(no_tta.predict_uint8(images)["klg"] - single[0]).max() > 1e-4


def test_selection_by_loss_or_metric_and_bad_choices_are_named(tiny_run):
    cfg = _cfg(select_by="loss", epochs=1)
    cfg.tasks.names = ["klg"]
    train.run(tiny_run, cfg)
    (payload,) = read_members(tiny_run / "checkpoints" / "twobranch" / "multitask.pt")
    assert payload["extra"]["selected_by"] == "val_loss"
    for key, value, match in [("select_by", "kappa", "cnn.select_by must be metric or loss"),
                              ("class_balance", "oversample", "cnn.class_balance must be none, weighted_loss"),
                              ("klg_head", "ordinal", "Unknown output head 'ordinal'"),
                              ("augment_policy", "heavy", "Unknown augmentation policy 'heavy'"),
                              ("hflip", "maybe", "cnn.hflip must be auto, true or false")]:
        with pytest.raises(ConfigError, match=match):
            train.run(tiny_run, _cfg(**{key: value}, epochs=1))


def test_cache_is_built_once_mirrors_left_knees_and_rebuilds_when_the_manifest_changes(tiny_run):
    m = read_manifest(tiny_run)
    plain = np.array(image_cache(tiny_run, m, 16, progress=False))
    assert plain.dtype == np.uint8 and plain.shape == (len(m), 16, 16)
    files = sorted((tiny_run / "cache").glob("*.u8"))
    assert len(files) == 1 and not list((tiny_run / "cache").glob("*.tmp"))
    image_cache(tiny_run, m, 16, progress=False)
    assert sorted((tiny_run / "cache").glob("*.u8")) == files  # reused, not rebuilt
    mirrored = np.array(image_cache(tiny_run, _mirror(tiny_run), 16, progress=False))
    left = (m["side"] == "L").to_numpy()
    assert np.array_equal(mirrored[left], plain[left][:, :, ::-1])
    assert np.array_equal(mirrored[~left], plain[~left])


def test_prepare_marks_left_knees_mirrored_and_stages_read_them_flipped(tmp_path):
    from PIL import Image

    from kneeoa.stages.prepare import prepare

    root = tmp_path / "kl" / "train"
    for grade, name in [(0, "9000001L"), (1, "9000001R"), (2, "9000002L"), (3, "9000002R")]:
        (root / str(grade)).mkdir(parents=True)
        img = np.zeros((20, 20), np.uint8)
        img[:, :5] = 255  # bright stripe on the image-left
        Image.fromarray(img).save(root / str(grade) / f"{name}.png")
    (tmp_path / "kl" / "val" / "0").mkdir(parents=True)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "kl" / "val" / "0" / "9000003R.png")
    cfg = Config()
    run = tmp_path / "run"
    m = prepare(run, cfg, source="folders", path=tmp_path / "kl")
    assert m.set_index("side")["mirrored"].groupby(level=0).all().to_dict() == {"L": True, "R": False}
    row = m[m["side"] == "L"].iloc[0]
    assert load_knee(run, row)[:, -5:].min() == 1.0 and load_knee(run, row)[:, :5].max() == 0.0
    cfg.data.mirror_left = False
    m2 = prepare(tmp_path / "run2", cfg, source="folders", path=tmp_path / "kl")
    assert not m2["mirrored"].any()


def test_augmentation_keeps_range_and_is_reproducible():
    from kneeoa.transforms.augment import POLICIES, Policy, augment_batch, tta_views

    x = torch.randint(0, 256, (6, 1, 24, 24), dtype=torch.uint8)
    a = augment_batch(x, POLICIES.get("strong"), hflip=True, generator=torch.Generator().manual_seed(1))
    b = augment_batch(x, POLICIES.get("strong"), hflip=True, generator=torch.Generator().manual_seed(1))
    assert a.shape == (6, 1, 24, 24) and a.min() >= 0 and a.max() <= 1 and torch.equal(a, b)
    identity = Policy(degrees=0, scale=(1, 1), translate=0, gamma=(1, 1), contrast=(1, 1), brightness=0)
    same = augment_batch(x, identity, hflip=False)
    assert torch.allclose(same, x.float() / 255, atol=2e-3)
    views = tta_views(x.float() / 255)
    assert len(views) == 7 and torch.equal(views[0], x.float() / 255)


def test_the_sharp_policy_adds_no_noise_or_blur_to_what_strong_warps():
    """On a flat grey batch (which any warp and exposure curve leave flat), `strong` leaves noise texture and
    `strong_sharp` none."""
    from kneeoa.transforms.augment import POLICIES, augment_batch

    x = torch.full((16, 1, 32, 32), 128, dtype=torch.uint8)
    spread = {name: augment_batch(x, POLICIES.get(name), hflip=False,
                                  generator=torch.Generator().manual_seed(3)).flatten(1).std(1)
              for name in ("strong", "strong_sharp")}
    assert spread["strong_sharp"].max() < 1e-6
    assert (spread["strong"] > 1e-3).sum() >= 8


def test_y_pred_drives_hard_metrics():
    from kneeoa.runfolder.predictions import make_prediction_table, validate_predictions
    from kneeoa.stats.metrics import METRICS

    probs = np.array([[0.6, 0.4], [0.6, 0.4], [0.3, 0.7]])
    t = make_prediction_table(["a", "b", "c"], ["val"] * 3, [0, 1, 1], probs, y_pred=[0, 1, 1])
    assert METRICS.get("accuracy").fn(t["y_true"], probs, t["y_pred"]) == 1.0
    assert METRICS.get("accuracy").fn(t["y_true"], probs) == pytest.approx(2 / 3)
    old = validate_predictions(t.drop(columns="y_pred"), "jsn")
    assert old["y_pred"].tolist() == [0, 0, 1]  # a table without y_pred reads as argmax
    with pytest.raises(Exception, match="column 'y_pred' is 7"):
        validate_predictions(t.assign(y_pred=[0, 7, 1]), "jsn")


def test_fast_affine_grid_matches_torch_and_the_opencv_warp_samples_the_same_points():
    import torch.nn.functional as F

    from kneeoa.transforms.augment import _cv2, affine_grid, pixel_matrices

    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = F.affine_grid(theta, (5, 1, 7, 9), align_corners=False)
    assert torch.allclose(affine_grid(theta, (7, 9)), expected, atol=1e-6)
    # A smooth ramp warped by OpenCV with the pixel maps vs grid_sample with the normalised theta: the same image up to
    # OpenCV's uint8 rounding, for rotations, zooms, shifts and flips, on the whole image and on a band of rows.
    g = torch.Generator().manual_seed(1)
    angle, scale = (torch.rand(6, generator=g) - 0.5) * 0.4, 0.85 + 0.3 * torch.rand(6, generator=g)
    flip, shift = torch.tensor([1.0, -1, 1, -1, 1, -1]), (torch.rand(6, 2, generator=g) - 0.5) * 0.2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    ramp = np.add.outer(np.arange(48) * 3, np.arange(40) * 2).astype(np.uint8)
    ref = F.grid_sample(torch.from_numpy(ramp).float().expand(6, 1, 48, 40), affine_grid(theta, (48, 40)),
                        mode="bilinear", padding_mode="border", align_corners=False)[:, 0].numpy()
    cv2 = _cv2()
    for top, bottom in ((0, 48), (13, 37)):
        maps = pixel_matrices(theta, (48, 40), top)
        got = np.stack([cv2.warpAffine(ramp, m, (40, bottom - top), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                       borderMode=cv2.BORDER_REPLICATE) for m in maps])
        assert np.abs(got - ref[:, top:bottom]).max() <= 0.51


def test_augmentation_blur_is_the_binomial_kernel_with_replicated_edges():
    import torch.nn.functional as F

    from kneeoa.transforms.augment import Policy, augment_batch

    x = torch.randint(0, 256, (3, 1, 8, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    blur_only = Policy(degrees=0, scale=(1, 1), translate=0, gamma=(1, 1), contrast=(1, 1), brightness=0, blur_p=1.0)
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).view(1, 1, 3, 3)
    expected = F.conv2d(F.pad(x.float() / 255, (1, 1, 1, 1), mode="replicate"), k)
    assert torch.allclose(augment_batch(x, blur_only, hflip=False), expected, atol=1e-6)


@pytest.mark.parametrize("workers", [0, 1])
def test_training_loader_augments_reproducibly_and_validation_only_normalises(workers):
    from kneeoa.stages.train import training_loaders
    from kneeoa.transforms.dataset import KneeDataset

    images = np.random.default_rng(0).integers(0, 256, (24, 16, 16), dtype=np.uint8)
    ds = KneeDataset(images, np.arange(24), {"klg": np.arange(24)})  # the label is the row, to find it in a batch
    hp = _cfg(augment_policy="strong", num_workers=workers).cnn
    hp.batch_size = 8

    def first_batches(seed):
        torch.manual_seed(seed)  # inline (workers=0) augmentation draws from the process generator
        train_dl, val_dl = training_loaders(ds, ds, hp, seed=seed, pre=Preprocess.for_cnn(16, 0.5, 0.25, in_chans=1),
                                            hflip=False, channels_last=False)
        return next(iter(train_dl)), next(iter(val_dl))

    def plain(rows):
        return (torch.from_numpy(images[rows]).float()[:, None] / 255 - 0.5) / 0.25

    (xa, ya), (va, vy) = first_batches(3)
    (xb, yb), _ = first_batches(3)
    assert xa.dtype == torch.float32 and xa.shape == (8, 1, 16, 16)
    assert torch.equal(xa, xb) and torch.equal(ya["klg"], yb["klg"])
    assert not torch.allclose(xa, plain(ya["klg"].numpy()), atol=0.05)  # augmented
    assert torch.equal(vy["klg"], torch.arange(8)) and torch.allclose(va, plain(np.arange(8)), atol=1e-6)


def test_augmentation_folds_the_normalisation_in_exactly():
    from kneeoa.transforms.augment import POLICIES, augment_batch

    x = torch.randint(0, 256, (6, 1, 24, 24), dtype=torch.uint8)
    plain = augment_batch(x, POLICIES.get("strong"), hflip=False, generator=torch.Generator().manual_seed(2))
    folded = augment_batch(x, POLICIES.get("strong"), hflip=False, generator=torch.Generator().manual_seed(2),
                           mean=0.4, std=0.2)
    assert torch.allclose(folded, (plain - 0.4) / 0.2, atol=1e-5)


def test_band_augmentation_gives_the_two_branch_net_what_a_whole_image_would():
    from dataclasses import replace

    from kneeoa.models.cnn.backbones import create_backbone, input_rows
    from kneeoa.transforms.augment import POLICIES, BatchTransform, augment_batch

    net = create_backbone("twobranch", source=None)[0].eval()
    top, bottom = input_rows(net, 48)
    assert 0 < top < bottom < 48 and input_rows(create_backbone("resnet18", source=None)[0], 48) is None
    x = torch.randint(0, 256, (6, 1, 48, 48), dtype=torch.uint8)
    policy = replace(POLICIES.get("strong"), blur_p=1.0)  # every image blurred: the band edges must match too
    full = augment_batch(x, policy, hflip=True, generator=torch.Generator().manual_seed(4), mean=0.5, std=0.25)
    band = augment_batch(x, policy, hflip=True, generator=torch.Generator().manual_seed(4), mean=0.5, std=0.25,
                         rows=(top, bottom))
    diff = (band[:, :, top:bottom] - full[:, :, top:bottom]).abs()
    assert (diff > 0).float().mean() < 0.01  # OpenCV's fixed-point sampling may round a few grey levels the other way
    assert (band[:, :, :top] == -2).all() and (band[:, :, bottom:] == -2).all()  # black outside the band
    # With a linear intensity table a grey level is 1/255 of the range: no pixel is further off than that.
    linear = replace(policy, gamma=(1.0, 1.0), contrast=(1.0, 1.0), brightness=0.0)
    full = augment_batch(x, linear, hflip=True, generator=torch.Generator().manual_seed(4), mean=0.5, std=0.25)
    band = augment_batch(x, linear, hflip=True, generator=torch.Generator().manual_seed(4), mean=0.5, std=0.25,
                         rows=(top, bottom))
    assert (band[:, :, top:bottom] - full[:, :, top:bottom]).abs().max() <= 1 / 255 / 0.25 + 1e-5
    outside = full.clone()
    outside[:, :, top:bottom] = band[:, :, top:bottom]
    with torch.inference_mode():  # the rows outside the band never reach the network
        assert torch.equal(net(band), net(outside))
    torch.manual_seed(5)
    pre = Preprocess.for_cnn(x.shape[-1], 0.5, 0.25, in_chans=1)
    collated, _ = BatchTransform(pre, policy, rows=(top, bottom))((x, {}))
    assert (collated[:, :, :top] == -2).all() and not (collated[:, :, top:bottom] == -2).all()


def test_grouped_geometry_moves_batch_neighbours_alike_and_keeps_their_own_intensity():
    from dataclasses import replace

    from kneeoa.transforms.augment import POLICIES, Policy, augment_batch

    one = torch.randint(0, 256, (1, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = one.expand(10, 1, 32, 32).contiguous()  # ten copies of one image: any difference is the augmentation's
    geometry = Policy(degrees=15.0, scale=(0.8, 1.2), translate=0.1, contrast=(1.0, 1.0), brightness=0.0)

    def run(policy, group, rows=None):
        return augment_batch(x, policy, hflip=True, generator=torch.Generator().manual_seed(6), group=group,
                             rows=rows)

    grouped, single = run(geometry, 4), run(geometry, 1)
    assert grouped.shape == (10, 1, 32, 32)
    for members in ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9)):  # the last group is a partial one
        assert all(torch.equal(grouped[members[0]], grouped[i]) for i in members[1:])
    assert not torch.equal(grouped[0], grouped[4]) and not torch.equal(grouped[4], grouped[8])
    assert not torch.equal(single[0], single[1])
    # Intensity, noise and blur stay per image: neighbours sharing a warp still differ.
    strong = run(POLICIES.get("strong"), 4)
    assert not torch.equal(strong[0], strong[1])
    # The band of a grouped call is the band of the same call over whole images, as with single draws.
    linear = replace(POLICIES.get("strong"), gamma=(1.0, 1.0), contrast=(1.0, 1.0), brightness=0.0, blur_p=1.0)
    assert (run(linear, 4, (8, 24))[:, :, 8:24] - run(linear, 4)[:, :, 8:24]).abs().max() <= 1 / 255 + 1e-5


@pytest.mark.parametrize("group", [0, 5])
def test_augment_group_outside_one_to_four_is_refused(group):
    from kneeoa.config_checks import config_problems
    from kneeoa.transforms.augment import POLICIES, augment_batch

    with pytest.raises(ValueError, match=f"group must be 1-4 .* got {group}"):
        augment_batch(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), POLICIES.get("strong"), hflip=False, group=group)
    problems = config_problems(_cfg(augment_group=group))
    assert any("cnn.augment_group" in p and "[1, 4]" in p for p in problems), problems


def test_training_loader_hands_the_configured_group_to_the_augmentation():
    from kneeoa.stages.train import training_loaders
    from kneeoa.transforms.dataset import KneeDataset

    ds = KneeDataset(np.zeros((8, 16, 16), dtype=np.uint8), np.arange(8), {"klg": np.zeros(8, dtype=int)})
    hp = _cfg(augment_policy="strong", augment_group=3).cnn
    train_dl, val_dl = training_loaders(ds, ds, hp, seed=0, pre=Preprocess.for_cnn(16, 0.5, 0.25, in_chans=1),
                                        hflip=False, channels_last=False)
    assert train_dl.collate_fn.group == 3 and val_dl.collate_fn.policy is None


def test_class_weight_power_reaches_the_loss_and_the_arm_record(tiny_run):
    """The square-root class weights train another network than the full ones from the same seed, and the arm
    records the power it was trained with."""
    cfg = _cfg(epochs=1)
    cfg.tasks.names = ["klg"]
    states = {}
    for power in (1.0, 0.5):
        cfg.cnn.class_weight_power = power
        train.run(tiny_run, cfg)
        (payload,) = read_members(tiny_run / "checkpoints" / "twobranch" / "multitask.pt")
        states[power] = payload["state_dict"]
        assert read_arms(tiny_run)["twobranch"]["details"]["class_weight_power"] == power
    assert any(not torch.equal(v, states[0.5][k]) for k, v in states[1.0].items())


def test_member_policies_train_each_seed_as_a_run_with_that_policy_would(tiny_run):
    """A mixed pair (`cnn.member_policies`): each member is the network its seed trains with its own policy in an
    unmixed run, bit for bit, each member's record names its policy, and the policy does change the network."""
    def members(**cnn):
        cfg = _cfg(epochs=1, **cnn)
        cfg.tasks.names = ["klg"]
        train.run(tiny_run, cfg)
        arm = "twobranch_ens" if cfg.cnn.ensemble_seeds > 1 else "twobranch"
        return read_members(tiny_run / "checkpoints" / arm / "multitask.pt")

    mixed = members(ensemble_seeds=2, augment_policy="strong", member_policies=["strong_sharp", "strong"])
    assert [m["extra"]["augment_policy"] for m in mixed] == ["strong_sharp", "strong"]
    assert [m["extra"]["seed"] for m in mixed] == [0, 1]
    details = read_arms(tiny_run)["twobranch_ens"]["details"]["members"]["multitask"]
    assert [d["augment_policy"] for d in details] == ["strong_sharp", "strong"]
    (sharp,) = members(augment_policy="strong_sharp")
    strong = members(ensemble_seeds=2, augment_policy="strong")
    for a, b in ((mixed[0], sharp), (mixed[1], strong[1])):
        assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    assert any(not torch.equal(v, strong[0]["state_dict"][k]) for k, v in mixed[0]["state_dict"].items())


def test_keep_epoch_weights_writes_every_epoch_and_the_kept_one_is_the_member(tiny_run):
    """`cnn.keep_epoch_weights` writes each epoch's weights and val score per seed; the best-scoring epoch holds the
    member's weights bit for bit; without the option nothing is written, and reading then names the option."""
    cfg = _cfg(epochs=3, ensemble_seeds=2, select_by="metric", patience=10)
    cfg.tasks.names = ["klg"]
    lightning = tiny_run / "checkpoints" / "twobranch" / "lightning"
    train.run(tiny_run, cfg)
    with pytest.raises(FileNotFoundError, match="keep_epoch_weights"):
        read_epoch_weights(lightning, "multitask")
    cfg.cnn.keep_epoch_weights = True
    train.run(tiny_run, cfg)
    epochs = read_epoch_weights(lightning, "multitask")
    members = read_members(tiny_run / "checkpoints" / "twobranch_ens" / "multitask.pt")
    assert sorted(epochs) == [0, 1]
    for member in members:
        kept = epochs[member["extra"]["seed"]]
        assert [e["epoch"] for e in kept] == [0, 1, 2]
        best = max(kept, key=lambda e: e["val_score"])  # the first of equal scores, as the checkpoint keeps it
        assert best["val_score"] == pytest.approx(member["extra"]["best_epoch_score"])
        assert all(torch.equal(v, best["state_dict"][k]) for k, v in member["state_dict"].items())
    later = [e for e in kept if e["epoch"] > 0]
    assert any(not torch.equal(v, later[0]["state_dict"][k]) for k, v in kept[0]["state_dict"].items())
    cfg.cnn.epochs = 1  # a fresh training clears the earlier training's epochs
    train.run(tiny_run, cfg)
    assert [e["epoch"] for e in read_epoch_weights(lightning, "multitask")[0]] == [0]
