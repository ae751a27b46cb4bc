"""One contract test per registry, parametrised over its entries when the tests are collected: an entry added to a
registry (built in, or from an outside package's entry points) is held to its registry's contract with no edit here.

The backbone, encoder, task, importer and localiser contracts also run on the `toy` entries of a small outside
package, installed for the test by the fixture `outside_plugins` (tests/plugin_package.py).
"""

from __future__ import annotations

import inspect
import itertools
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from kneeoa.arms.predictors import PREDICTORS, OtherArmKind
from kneeoa.config import Config
from kneeoa.deploy.package import MODEL_KINDS, ModelKind, export_arm, load_model
from kneeoa.errors import KneeoaError
from kneeoa.localize.core import LOCALIZERS, LocalizationError
from kneeoa.models.cnn.backbones import BACKBONES, create_backbone, norm_stats
from kneeoa.models.cnn.heads import HEADS as OUTPUT_HEADS
from kneeoa.models.encoders.foundation import ENCODERS, create_encoder
from kneeoa.models.encoders.loaders import LOADERS
from kneeoa.models.probes import HEADS as EMBEDDING_HEADS
from kneeoa.report.sections import SECTIONS
from kneeoa.runfolder import RUN_FILES
from kneeoa.runfolder.arms import read_arms
from kneeoa.runfolder.heads import load_head, save_head
from kneeoa.sources.importers import IMPORTERS, get_importer
from kneeoa.sources.manifest import REQUIRED
from kneeoa.stages import STAGES, get_stage
from kneeoa.stages import fusion as fusion_stage
from kneeoa.stages import pretrain as pretrain_stage
from kneeoa.stages.prepare import prepare
from kneeoa.stats.metrics import METRICS
from kneeoa.synthetic.phantom import render_spec, simulate_cohort
from kneeoa.synthetic.phantom.films import render_film
from kneeoa.synthetic.phantom.quality import DEGRADATIONS
from kneeoa.synthetic.phantom.render import MASK_NAMES
from kneeoa.tasks import HEADLINE_METRIC, RAW_GRADE_COLUMNS, TASKS
from kneeoa.transforms.augment import POLICIES, augment_batch
from kneeoa.transforms.dataset import MISSING_LABEL
from malformed_corpus import CLEAN
from plugin_package import TOY

#: Entries whose stand-in snapshot (conftest `standin_snapshots`) is narrower than the published model: their
#: declared embedding sizes are checked on full-size stand-ins (`-m slow`).
NARROW_STANDINS = {"biomedclip", "rad-dino"}


def with_toy(registry) -> list[str]:
    """The registry's entries, then the outside package's `toy` entry."""
    return [*(n for n in registry.names() if n != TOY), TOY]


@pytest.fixture
def installed(request):
    """Installs the outside package when the test runs on its `toy` entry."""
    if request.node.callspec.params.get("name") == TOY:
        return request.getfixturevalue("outside_plugins")
    return None


def phantom_film(spacing_mm: float = 0.5):
    right, left = simulate_cohort(patients=1, visits=1, seed=5, low_quality_share=0.0)[:2]
    return render_film(right, left, spacing_mm=spacing_mm, rng=np.random.default_rng(5))


# -------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", with_toy(BACKBONES))
def test_backbone_contract(name, installed):
    """Forward (B, num_features), finite, gradients reach the first layer, CAM layers are spatial submodules,
    normalisation statistics are declared."""
    assert BACKBONES.get(name).name == name
    torch.manual_seed(0)
    net, err = create_backbone(name, source=None)
    assert err is None
    x = torch.rand(2, 1, 32, 32)
    seen = {}
    for key, layer in BACKBONES.get(name).cam_layers.items():
        layer(net).register_forward_hook(lambda m, i, o, k=key: seen.setdefault(k, o))
    out = net(x)
    assert out.shape == (2, net.num_features) and torch.isfinite(out).all()
    assert {"last", "penultimate"} <= set(seen)
    assert all(o.ndim == 4 and o.shape[0] == 2 for o in seen.values())  # (B, C, h, w): a map Grad-CAM can weight
    out.square().mean().backward()
    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert first.weight.grad is not None and torch.isfinite(first.weight.grad).all() and first.weight.grad.any()
    cfg = net.pretrained_cfg
    assert len(cfg["mean"]) == len(cfg["std"]) and all(s > 0 for s in cfg["std"])
    mean, std = norm_stats(net)
    assert 0 <= mean <= 1 and std > 0


@pytest.mark.parametrize("name", with_toy(ENCODERS))
def test_encoder_contract(name, installed, standin_snapshots):
    """Every feature choice: (B, dim) finite float32, the same twice, the declared size (where the stand-in has
    the published width), different images give different vectors."""
    spec = ENCODERS.get(name)
    assert spec.name == name and spec.default_features in spec.features
    weights = installed["encoder_weights"] if name == TOY else standin_snapshots[name]
    images = np.random.default_rng(0).random((3, 40, 48), dtype=np.float32)
    for features, declared in spec.features.items():
        enc = create_encoder(name, weights, features=features, precision="fp32", device="cpu")
        out = enc.encode(images)
        assert out.shape == (3, enc.dim) and out.dtype == np.float32 and np.isfinite(out).all()
        assert np.array_equal(out, enc.encode(images))
        assert not np.allclose(out[0], out[1])
        if name not in NARROW_STANDINS:
            assert enc.dim == declared, features
        hook = LOADERS.get(spec.library).cam
        if hook is not None:  # Grad-CAM's layer is a module of the model the library built
            assert any(hook.layer(enc) is m for m in enc.model.modules())


@pytest.mark.parametrize("name", LOADERS.names())
def test_encoder_library_serves_an_encoder(name):
    assert callable(LOADERS.get(name).load)
    assert any(ENCODERS.get(e).library == name for e in ENCODERS.names()), f"no encoder is built with '{name}'"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NARROW_STANDINS))
def test_encoder_gives_its_declared_sizes_at_the_published_width(name, tmp_path):
    from standins import build_biomedclip, build_raddino

    snapshot = {"biomedclip": build_biomedclip, "rad-dino": build_raddino}[name](tmp_path / name, full_size=True)
    for features, declared in ENCODERS.get(name).features.items():
        enc = create_encoder(name, snapshot, features=features, precision="fp32", device="cpu")
        assert enc.dim == declared and enc.encode(np.zeros((1, 64, 64), np.float32)).shape == (1, declared)


@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("name", OUTPUT_HEADS.names())
def test_output_head_contract(name, k):
    """Probabilities over K classes summing to 1; a finite loss that one gradient step lowers; missing labels
    ignored."""
    head = OUTPUT_HEADS.get(name)
    assert head.name == name
    torch.manual_seed(0)
    x, y = torch.randn(20, 8), torch.arange(20) % k
    layer = nn.Linear(8, head.n_outputs(k))
    probs = head.probs(layer(x), k)
    assert probs.shape == (20, k) and (probs >= 0).all()
    assert torch.allclose(probs.sum(dim=1), torch.ones(20), atol=1e-5)
    weight = torch.ones(k)
    loss = head.loss(layer(x), y, weight, 0.0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    with torch.no_grad():
        for p in layer.parameters():
            p -= 0.5 * p.grad
        assert head.loss(layer(x), y, weight, 0.0) < loss
        partly = torch.where(torch.arange(20) % 3 == 0, MISSING_LABEL, y)
        kept = partly != MISSING_LABEL
        assert head.loss(layer(x), partly, weight, 0.0) == pytest.approx(
            float(head.loss(layer(x[kept]), y[kept], weight, 0.0)), rel=1e-5)
        assert torch.isfinite(head.loss(layer(x), y, weight, 0.1))


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", EMBEDDING_HEADS.names())
def test_embedding_head_contract(name, k, tmp_path):
    """Fitted on separable blobs (train, chosen on val): test probabilities (n, K) summing to 1 that separate the
    classes, and the kept head reads back with the same probabilities."""
    rng = np.random.default_rng(k)
    centres = rng.normal(0, 4, (k, 6))

    def blobs(n):
        y = np.arange(n) % k
        return (centres[y] + rng.normal(0, 0.5, (n, 6))).astype(np.float32), y

    (xtr, ytr), (xva, yva), (xte, yte) = blobs(60), blobs(30), blobs(30)
    cfg = Config()
    cfg.foundation.xgb_grid, cfg.foundation.xgb_n_estimators, cfg.foundation.n_jobs = {"max_depth": [2]}, 30, 1
    model, chosen = EMBEDDING_HEADS.get(name)(xtr, ytr, xva, yva, k, cfg)
    probs = model.predict_proba(xte)
    assert probs.shape == (30, k) and np.allclose(probs.sum(axis=1), 1, atol=1e-6)
    assert (probs.argmax(axis=1) == yte).mean() > 0.9 and np.isfinite(chosen["val_logloss"])
    kept = load_head(name, save_head(name, model, tmp_path / "head.json", k))
    assert np.allclose(kept.predict_proba(xte.astype(np.float64)), probs, atol=1e-5)


# ----------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("name", with_toy(TASKS))
def test_task_contract(name, installed):
    """Every allowed source grade maps into the task's classes; the kind, class count, headline metric and masks
    agree with the other registries."""
    task = TASKS.get(name)
    assert task.name == name and task.kind in HEADLINE_METRIC and task.n_classes == len(task.classes) >= 2
    assert (task.kind == "binary") == (task.n_classes == 2)
    assert task.kind in METRICS.get(task.headline_metric).kinds
    assert set(task.masks) <= set(MASK_NAMES) and set(task.sources) <= set(RAW_GRADE_COLUMNS)
    if not task.sources:  # the label column is its own source
        labels = task.derive(pd.DataFrame({name: range(task.n_classes)}))
        assert labels.tolist() == list(range(task.n_classes))
        return
    grades = pd.DataFrame(list(itertools.product(range(4), repeat=len(task.sources))), columns=list(task.sources))
    for threshold in (1, 2, 3) if task.reduce == "any" else (None,):
        labels = task.derive(grades, threshold=threshold)
        assert labels.notna().all() and labels.isin(range(task.n_classes)).all()
        worst = grades.max(axis=1)
        expected = (worst >= threshold).astype(int) if task.reduce == "any" else worst
        assert labels.astype(int).tolist() == expected.tolist()
    assert task.derive(grades.iloc[:1].astype(float) * np.nan).isna().all()  # no grade read: no label


@pytest.mark.parametrize("name", with_toy(IMPORTERS))
def test_importer_contract(name, installed, tmp_path):
    """The spec names an importer `fn(source, run_dir, cfg) -> ImportResult` and options it can read; its clean
    source (`malformed_corpus.CLEAN`; none for an importer that reads no files) imports whole through prepare."""
    spec = IMPORTERS.get(name)
    inspect.signature(get_importer(name)).bind(None, tmp_path, Config())
    assert len({o.name for o in spec.options}) == len(spec.options) and spec.summary
    cfg = Config()
    cfg.data.patients, cfg.data.visits, cfg.data.image_size, cfg.data.workers = 4, 1, 64, 1
    if spec.path_help is None:
        source = None
    else:
        assert name in CLEAN, f"importer '{name}' has no clean source in tests/malformed_corpus.py"
        source = CLEAN[name](tmp_path / "source")
    manifest = prepare(tmp_path / "run", cfg, source=name, path=source)
    assert len(manifest) > 0 and set(REQUIRED) <= set(manifest.columns) and manifest["image_id"].is_unique
    assert all((tmp_path / "run" / p).is_file() for p in manifest["image_path"])
    assert not any((tmp_path / "run" / table).exists() for table in ("quarantine.parquet", "skipped.parquet"))


@pytest.mark.parametrize("name", with_toy(LOCALIZERS))
def test_localizer_contract(name, installed):
    """Both knees of a phantom bilateral film within 5 mm, image-left first; a blank film is refused by region."""
    localize = LOCALIZERS.get(name)
    film, centres, px = phantom_film()
    knees = localize(film, (px, px), knees=2)
    assert len(knees) == 2 and knees[0].col_px < knees[1].col_px
    for knee, (row, col) in zip(knees, (centres["R"], centres["L"]), strict=True):
        assert np.hypot(knee.row_px - row, knee.col_px - col) * px < 5.0
        assert 0 < knee.confidence <= 1
    for blank in (np.zeros_like(film), np.full_like(film, 0.5)):
        with pytest.raises(LocalizationError, match="image-left half"):
            localize(blank, (px, px), knees=2)


@pytest.mark.parametrize("name", DEGRADATIONS.names())
def test_degradation_contract(name):
    """A fault keeps the image's shape, changes it, and changes it more at full severity."""
    img = render_spec(simulate_cohort(patients=1, visits=1, seed=2, low_quality_share=0.0)[0], out_px=96).image
    fault = DEGRADATIONS.get(name)

    def distance(severity):
        out = fault(img.copy(), severity, np.random.default_rng(0), 0.5)
        assert out.shape == img.shape and np.isfinite(out).all()
        return float(np.abs(np.clip(out, 0, 1) - img).mean())

    assert 0.01 < distance(0.3) < distance(1.0)


@pytest.mark.parametrize("name", POLICIES.names())
def test_augmentation_policy_contract(name):
    """Ordered ranges; a batch comes back in shape, in [0, 1], reproducible from the generator and changed."""
    policy = POLICIES.get(name)
    for lo, hi in (policy.scale, policy.gamma, policy.contrast):
        assert 0 < lo <= hi
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 1, 32, 32), dtype=np.uint8))
    a, b = (augment_batch(x, policy, hflip=True, generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert a.shape == x.shape and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.allclose(a, x.float() / 255, atol=0.02)


@pytest.mark.parametrize("name", pretrain_stage.METHODS.names())
def test_pretraining_method_contract(name):
    method = pretrain_stage.METHODS.get(name)
    torch.manual_seed(0)
    model = method.build(create_backbone("twobranch", source=None)[0])
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 1, 32, 32), dtype=np.uint8))
    loss = method.step(model, x, POLICIES.get("ssl"), mean=0.5, std=0.25, temperature=0.2)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and method.title
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------ stages and runs


@pytest.mark.parametrize("name", STAGES.names())
def test_stage_contract(name):
    """A callable `run(run_dir, cfg)`; needs, reads and writes name run-folder files; it owns what it writes, and
    every file it needs is written by a stage."""
    spec = STAGES.get(name)
    inspect.signature(spec.load()).bind(Path("run"), Config())
    assert get_stage(name).__name__ == f"run_{name}"
    for file in (*spec.needs, *spec.reads, *spec.writes):
        assert file in RUN_FILES, file
    assert not set(spec.needs) & set(spec.reads)
    for file in spec.writes:
        assert name in RUN_FILES.get(file).owners, file
    for file in spec.needs:
        assert any(file in STAGES.get(s).writes for s in STAGES.names() if s != name), file


@pytest.mark.parametrize("name", RUN_FILES.names())
def test_run_file_contract(name, tmp_path):
    """Owned by stages (or the study), and found by its own pattern once a file of it is written."""
    file = RUN_FILES.get(name)
    assert file.name == name and file.what and file.owners
    assert set(file.owners) <= {*STAGES.names(), "run"}
    assert not file.exists(tmp_path)
    example = tmp_path / file.pattern.replace("**/", "").replace("*", "x")
    example.parent.mkdir(parents=True, exist_ok=True)
    example.write_text("x")
    assert file.paths(tmp_path) == [example] and file.exists(tmp_path)


_BLOCKS = {"div", "table", "tr", "td", "th", "ul", "ol", "li", "details", "summary", "figure", "h2", "h3", "p", "pre"}


def _unbalanced(html: str) -> list[str]:
    """Block tags of an HTML fragment left open, then end tags that close another tag."""
    open_, stray, parser = [], [], HTMLParser()
    parser.handle_starttag = lambda tag, attrs: open_.append(tag) if tag in _BLOCKS else None
    parser.handle_endtag = lambda tag: tag in _BLOCKS and (
        open_.pop() if open_ and open_[-1] == tag else stray.append(tag))
    parser.feed(html)
    parser.close()
    return open_ + stray


def _tree(run: Path) -> dict[str, int]:
    return {p.relative_to(run).as_posix(): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", SECTIONS.names())
def test_report_section_contract(name, finished_run):
    """Renders on a finished run: None (nothing for it) or an HTML fragment with a heading and balanced blocks; it
    writes nothing into the run folder."""
    run, cfg = finished_run
    before = _tree(run)
    html = SECTIONS.get(name)(run, cfg)
    assert _tree(run) == before
    if html is not None:
        assert html.startswith("<h2>") and _unbalanced(html) == []


def _crops(run: Path, n: int = 3) -> list[np.ndarray]:
    from kneeoa.formats.images import load_gray

    return [load_gray(p) for p in sorted((run / "crops").glob("*.png"))[:n]]


@pytest.mark.parametrize("name", MODEL_KINDS.names())
def test_model_kind_contract(name, finished_run, tmp_path):
    """Owns an arm of a finished run, packages it, and loads back as a `KneeModel`."""
    run, _ = finished_run
    kind = MODEL_KINDS.get(name)
    assert isinstance(kind, ModelKind) and kind.name == name
    owned = [arm for arm, rec in read_arms(run).items() if rec["status"] == "ran" and kind.owns(run, arm, rec)]
    assert owned
    model = load_model(export_arm(run, owned[0], tmp_path / "package"))
    crops, sides = _crops(run), ["R", "L", "R"]
    probs = model.predict_proba(crops, sides)
    assert probs and set(probs) == set(model.info["tasks"])
    for task, p in probs.items():
        k = len(model.info["tasks"][task]["classes"])
        assert p.shape == (3, k) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
        assert set(model.decode(task, p).tolist()) <= set(range(k))
    assert model.features(crops, sides).shape[0] == 3
    cam = model.cam(crops[0], "R", next(iter(probs)), 1)
    assert cam is None or (cam.ndim == 2 and 0 <= cam.min() and cam.max() <= 1)  # at the model's input size


def test_every_arm_of_a_run_is_packaged_or_refused_by_name(finished_run, tmp_path):
    run, _ = finished_run
    for arm in read_arms(run):
        try:
            export_arm(run, arm, tmp_path / arm)
        except KneeoaError as e:
            assert "is not a kind that can be packaged" in str(e)


@pytest.mark.parametrize("name", PREDICTORS.names())
def test_arm_predictor_contract(name, finished_run):
    """Takes some arm of a finished run (and no other entry takes it) and re-runs it on crops: (n, K) probabilities
    summing to 1."""
    run, cfg = finished_run
    predictor = PREDICTORS.get(name)
    taken = []
    for arm in read_arms(run):
        try:
            predict = predictor(run, arm, "klg", cfg)
        except OtherArmKind:
            continue
        taken.append(arm)
        probs = predict(_crops(run))
        assert probs.shape == (3, TASKS.get("klg").n_classes) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert taken
    for other in (n for n in PREDICTORS.names() if n != name):
        for arm in taken:
            with pytest.raises(OtherArmKind):
                PREDICTORS.get(other)(run, arm, "klg", cfg)


@pytest.mark.parametrize("name", fusion_stage.METHODS.names())
def test_fusion_method_contract(name, finished_run):
    """The arms a method names are arms the fusion stage made in a finished run, with prediction tables."""
    run, cfg = finished_run
    arms = fusion_stage.METHODS.get(name).arms(cfg)
    records = read_arms(run)
    assert arms and all(records[arm]["status"] == "ran" for arm in arms)
    assert all(list((run / "predictions").glob(f"{arm}__*.parquet")) for arm in arms)
