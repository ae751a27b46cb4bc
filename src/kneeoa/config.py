"""Typed study config with documented defaults, loaded from YAML and written back out in full.

Defaults describe the full study (OAI scale, 224 px, both CNNs, both foundation models). The demo presets in
`kneeoa/configs/` shrink it to what two CPU cores finish in minutes. Every run writes its resolved config, every
default spelled out, to RUN_DIR/config.yaml, so `kneeoa run RUN_DIR/config.yaml` repeats it.

Where the paper is silent we choose, and the choice is a key here: the binarisation threshold (`tasks.thresholds`),
the split (`data.split_fractions`, by patient), the crop (`data.crop_mm`), zero-shot prompts (`zeroshot.*`) and the
XGBoost search (`foundation.xgb_grid`).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from kneeoa.errors import ConfigError

_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


@dataclass
class DataCfg:
    source: str = "phantom"  # an importer (kneeoa.sources.importers: phantom | folders | oai | csv) or manifest (an
    # existing RUN_DIR/manifest.parquet)
    path: str | None = None  # source folder or table (not used by the phantom)
    patients: int = 400  # phantom: number of patients
    visits: int = 2  # phantom: visits per patient
    image_size: int = 224  # crop size in pixels written to RUN_DIR/crops
    low_quality_share: float = 0.08  # phantom: share of deliberately low-quality images
    crop_mm: float = 140.0  # knee crop side in mm around the joint centre (films)
    # True: every importer marks left knees `mirrored` in the manifest and every stage reads them flipped
    # left-right, so all knees share the right-knee orientation (files on disk stay as acquired).
    mirror_left: bool = True
    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    csv_columns: dict[str, str] = field(default_factory=dict)  # csv importer: manifest column -> table column
    workers: int = 2  # processes for prepare (DICOM decoding, localisation)
    localizer: str = "heatmap"  # knee localiser for films (kneeoa.localize.core.LOCALIZERS; built in: heatmap, profile)
    default_spacing_mm: float | None = None  # films without pixel spacing: assume this (mm); None quarantines them
    csv_kind: str = "auto"  # csv importer without a `kind` column: auto | crop | single | bilateral
    # The knee check prepare runs on every imported image (manifest columns knee_score, not_knee; a report
    # section): builtin (the default built-in grader's), a built-in's name, a model package folder, or none.
    knee_check: str = "builtin"
    # importer -> its own options, for importers whose options are not fields above (kneeoa.sources.importers)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class TasksCfg:
    names: list[str] = field(default_factory=lambda: ["klg", "osteophytes", "jsn", "sclerosis"])
    # Minimum OARSI grade that makes a binary feature "present"; the paper does not say, we default to 1.
    thresholds: dict[str, int] = field(default_factory=dict)


@dataclass
class CnnCfg:
    backbones: list[str] = field(default_factory=lambda: ["resnet18", "convnext_small"])
    # keyword arguments of the backbone's constructor, stored in every checkpoint and package; e.g. twobranch:
    # {patch_height: 0.4} (the share of the crop's height it reads), timm: {drop_path_rate: 0.1}
    backbone_args: dict[str, Any] = field(default_factory=dict)
    image_size: int = DataCfg.image_size  # network input side in pixels; by default the crops' own size
    multitask: bool = True  # one shared backbone with a head per task; False trains one model per task
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    mixup: float = 0.0  # a of the Beta(a, a) blend of batch pairs in training (kneeoa.models.cnn.mixup); 0 = off
    class_balance: str = "weighted_loss"  # none | weighted_loss (inverse-frequency class weights) | balanced_sampling
    class_weight_power: float = 1.0  # weighted_loss: the inverse frequency to this power (0.5: its square root)
    klg_head: str = "ce"  # output head for ordinal tasks (KLG): ce | corn | regression (kneeoa.models.cnn.heads)
    klg_decode: str = "argmax"  # argmax | cutpoints (expected grade, cut-points tuned on val for quadratic kappa)
    cutpoint_bootstrap: int = 0  # >0: each cut-point is the median over that many val-patient bootstrap tunings
    cutpoint_accuracy_weight: float = 0.0  # cut-points maximise quadratic kappa + this x accuracy (0: kappa alone)
    select_by: str = "metric"  # model selection / early stopping: metric (mean headline val metric) | loss (val loss)
    patience: int = 6  # early stopping on the selection criterion, in epochs
    max_minutes: float | None = None  # wall-clock cap per network (Lightning max_time); None = no cap
    augment: bool = True
    augment_policy: str = "standard"  # standard | strong (kneeoa.transforms.augment.POLICIES)
    # one policy per ensemble member, in seed order (e.g. [strong_sharp, strong]); empty: augment_policy for all
    member_policies: list[str] = field(default_factory=list)
    augment_group: int = 1  # 1-4 batch neighbours share one geometric draw, warped in one call (cheaper on CPU)
    hflip: str = "auto"  # horizontal-flip augmentation: auto (only when the data are not mirrored) | true | false
    ema: float | None = None  # decay of an exponential moving average of the weights (e.g. 0.998); None = off
    keep_epoch_weights: bool = False  # also write every epoch's weights, for offline study (models/cnn/epoch_weights)
    tta: bool = False  # test-time augmentation: average the probabilities over small shifts and scales
    ensemble_seeds: int = 1  # >1 trains that many seeds and adds the averaged arm `<backbone>_ens`
    together: bool = False  # the seeds train side by side in one loop on the same batches (augmented once for all)
    mutual: float = 0.0  # >0: together, and each seed also fits the others' grades (kneeoa.models.cnn.mutual)
    pretrained: str = "auto"  # auto (hub/cache if reachable, else random init) | none | a weights file path
    weights: dict[str, str] = field(default_factory=dict)  # backbone -> local weights file (.pth/.safetensors)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # backbone -> any of the keys above
    accelerator: str = "auto"  # passed to Lightning
    devices: Any = "auto"  # passed to Lightning
    strategy: str = "auto"  # passed to Lightning (ddp, ddp_spawn, ...)
    num_nodes: int = 1  # passed to Lightning (SLURM / torchrun multi-node)
    precision: str = "auto"  # auto: bf16-mixed on CPUs with bf16, 16-mixed on GPU, else 32; or a Lightning value
    channels_last: str = "auto"  # auto: on for ResNets, off for ConvNeXt (slower on CPU); true | false
    num_workers: int = 0  # training-batch worker processes (fetch + augmentation); 0 = inline, best on CPU only
    max_train_images: int | None = None  # cap for quick runs; None = all


@dataclass
class FoundationCfg:
    encoders: list[str] = field(default_factory=lambda: ["biomedclip", "rad-dino"])
    weights: dict[str, str] = field(default_factory=dict)  # encoder -> local snapshot folder (hub layout)
    weights_root: str | None = None  # folder with one snapshot per encoder (<root>/biomedclip, <root>/rad-dino)
    device: str = "auto"  # auto (cuda when visible, else cpu) | cpu | cuda | cuda:N
    batch_size: int = 16
    # encoder -> feature choice (`kneeoa models list` shows each entry's choices); unset: the entry's first choice,
    # e.g. biomedclip: projected (512-d) | pre_projection (768-d); rad-dino: cls (768-d) | cls_mean_patch (1536-d)
    features: dict[str, str] = field(default_factory=dict)
    precision: str = "auto"  # auto: bf16 on CPUs with bf16 / GPUs; fp32
    linear_probe: bool = True
    linear_c_grid: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0])  # chosen on val
    xgb_grid: dict[str, list[Any]] = field(default_factory=lambda: {
        "max_depth": [3, 5], "learning_rate": [0.05, 0.1], "min_child_weight": [1, 5]})
    xgb_n_estimators: int = 500  # upper bound; early stopping on val picks the number of trees
    xgb_early_stopping: int = 30
    xgb_max_bin: int = 64
    n_jobs: int = 2


@dataclass
class ZeroShotCfg:
    enabled: bool = True
    encoder: str = "biomedclip"  # an image-text encoder whose registry entry says it can do zero-shot
    template: str = "this is a photo of {label}"  # BiomedCLIP model card template
    knee_label: str = "knee X-ray"
    labels: list[str] = field(default_factory=lambda: [
        "knee X-ray", "chest X-ray", "hand X-ray", "pelvis X-ray", "spine X-ray", "skull X-ray", "foot X-ray"])
    klg_prompts: list[str] = field(default_factory=lambda: [
        "a knee X-ray with no osteoarthritis", "a knee X-ray with doubtful osteoarthritis",
        "a knee X-ray with minimal osteoarthritis", "a knee X-ray with moderate osteoarthritis",
        "a knee X-ray with severe osteoarthritis"])


@dataclass
class StatsCfg:
    n_boot: int = 1000  # bootstrap resamples (over patients)
    confidence: float = 0.95
    seed: int = 0
    calibration_bins: int = 10  # equal-width bins for ECE and reliability diagrams
    compare_split: str = "test"  # split on which arms are compared pairwise (and ROC bands drawn)
    # Metrics compared between arms, per task kind; a binary "auc" uses DeLong's test, the rest a paired bootstrap.
    compare_metrics: dict[str, list[str]] = field(default_factory=lambda: {
        "binary": ["auc", "accuracy", "balanced_accuracy"],
        "ordinal": ["kappa_quadratic", "accuracy", "balanced_accuracy"]})


@dataclass
class ExplainCfg:
    per_grade: int = 2  # overlays per true grade, correct and wrong
    max_score_images: int = 200  # test images used to score CAMs against phantom masks
    seed: int = 0
    pointing_tolerance: float = 0.03  # pointing-game tolerance as a share of the mask side (~7 px at 224 px)
    batch_size: int = 16  # images per Grad-CAM forward/backward pass
    # Which block Grad-CAM hooks: "penultimate" (default) or "last". At the demo's 128 px input the last ResNet18
    # stage is a 4x4 grid of 32 px cells, too coarse for millimetre-sized osteophytes; the stage before is 8x8.
    cam_layer: str = "penultimate"
    split: str = "test"  # whose images the montages show and the mask scores use (val where test is held out)
    # Occlusion maps for every arm (model-agnostic; FM arms are re-embedded): a grey patch slides over the crop and
    # the map is the drop in the explained class's probability. Sizes are shares of the crop side.
    occlusion: bool = True
    occlusion_images: int = 8  # test images per arm x task for the maps' mask scores (phantom); 0 turns them off
    occlusion_patch: float = 0.2  # patch side as a share of the crop side
    occlusion_stride: float = 0.1  # step between patch positions, as a share of the crop side
    occlusion_batch: int = 64  # occluded copies per forward pass


@dataclass
class FusionCfg:
    """Hybrid arms over arms that already ran (`kneeoa fusion`, `kneeoa.stages.fusion`): the study's future work."""

    arms: list[str] = field(default_factory=list)  # member arms (CNN, embedding+head, ...): at least two
    # stack: a logistic stacker over the members' class probabilities, cross-fitted on val by patient and applied
    # unchanged to test (arm `fusion_stack`); features: the CNN members' pooled features concatenated with the
    # embedding members' vectors, into the boost heads, fitted on train and chosen on val (`fusion_features_<head>`)
    methods: list[str] = field(default_factory=lambda: ["stack", "features"])
    folds: int = 5  # patient-grouped cross-fitting folds of val for the stacker
    stack_c: float = 1.0  # inverse L2 strength of the stacker
    heads: list[str] = field(default_factory=lambda: ["xgb", "linear"])  # heads of the feature-fusion arms


@dataclass
class PretrainCfg:
    """Self-supervised pretraining of a knee encoder (`kneeoa pretrain`, `kneeoa.stages.pretrain`)."""

    backbone: str = "twobranch"  # a cnn backbone (kneeoa.models.cnn.backbones.BACKBONES)
    image_size: int = 160
    method: str = "simclr"  # kneeoa.stages.pretrain.METHODS
    epochs: int = 100  # upper bound; max_minutes usually ends training first
    batch_size: int = 256  # images per step (two views each)
    lr: float = 0.002  # AdamW peak, cosine-annealed within whichever of epochs / max_minutes ends first
    weight_decay: float = 1e-4
    temperature: float = 0.2
    max_minutes: float = 35.0
    # Only train images by default: pretraining on val/test images would let the encoder see the evaluation images.
    splits: list[str] = field(default_factory=lambda: ["train"])
    extra_dirs: list[str] = field(default_factory=list)  # further unlabelled image folders (searched recursively)
    checkpoint_every_s: float = 60.0  # resume state written at least this often


@dataclass
class Config:
    name: str = "study"
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: [
        "prepare", "train", "embed", "boost", "zeroshot", "evaluate", "stats", "explain", "report"])
    data: DataCfg = field(default_factory=DataCfg)
    tasks: TasksCfg = field(default_factory=TasksCfg)
    cnn: CnnCfg = field(default_factory=CnnCfg)
    foundation: FoundationCfg = field(default_factory=FoundationCfg)
    zeroshot: ZeroShotCfg = field(default_factory=ZeroShotCfg)
    stats: StatsCfg = field(default_factory=StatsCfg)
    explain: ExplainCfg = field(default_factory=ExplainCfg)
    pretrain: PretrainCfg = field(default_factory=PretrainCfg)
    fusion: FusionCfg = field(default_factory=FusionCfg)


def check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return check_type(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} must be {tp}. Got {value!r}.")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list. Got {value!r}.")
        (inner,) = typing.get_args(tp)
        return [check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping. Got {value!r}.")
        return dict(value)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads `1e-3` (no dot) as text; people write floats that way
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where} must be {getattr(tp, '__name__', tp)}. Got {value!r}.")


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values. Got {data!r}.")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ConfigError(f"Unknown key '{unknown[0]}' in {where}. Valid keys: {', '.join(valid)}.")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _from_dict(tp, value, f"{where}.{key}")
        else:
            kwargs[key] = check_type(value, tp, f"{where}.{key}")
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


#: Keys of earlier versions -> (section, mapping key, entry): read into their new place, so old run folders load.
_RENAMED = {"biomedclip_features": ("foundation", "features", "biomedclip"),
            "raddino_features": ("foundation", "features", "rad-dino")}


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A config written by an earlier version, with its renamed keys moved to where they live now."""
    section = data.get("foundation")
    if not isinstance(section, dict) or not set(section) & set(_RENAMED):
        return data
    section = dict(section)
    for old, (_, key, entry) in _RENAMED.items():
        if old in section:
            section.setdefault(key, {}).setdefault(entry, section.pop(old))
    return {**data, "foundation": section}


def config_from_dict(data: dict[str, Any], where: str = "config") -> Config:
    """Build a Config from a (partial) mapping; unknown keys and wrong types raise ConfigError naming the key."""
    return _from_dict(Config, _upgrade(data or {}), where)


def preset(name: str) -> Config:
    """A packaged preset from kneeoa/configs/<name>.yaml (demo, demo_quick)."""
    text = resources.files("kneeoa").joinpath("configs", f"{name}.yaml").read_text()
    return config_from_dict(yaml.safe_load(text), where=f"preset {name}")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def backbone_cfg(cfg: CnnCfg, backbone: str) -> CnnCfg:
    """The CNN settings for one backbone: the common ones with `cfg.overrides[backbone]` applied."""
    over = cfg.overrides.get(backbone, {})
    base = dataclasses.asdict(cfg)
    return _from_dict(CnnCfg, _merge(base, dict(over)), f"cnn.overrides.{backbone}")


def member_policy_problem(cfg: CnnCfg) -> str | None:
    """Why `cfg.member_policies` cannot be followed (one line naming the key and the fix), or None when it can."""
    if not cfg.member_policies:
        return None
    n = max(1, cfg.ensemble_seeds)
    if len(cfg.member_policies) != n:
        return (f"cnn.member_policies: {cfg.member_policies!r} must name one policy per ensemble seed, in seed "
                f"order (cnn.ensemble_seeds: {n}); it names {len(cfg.member_policies)}. Or leave it empty.")
    if cfg.together or cfg.mutual:
        return ("cnn.member_policies: the seeds of a cohort trained together (cnn.together, cnn.mutual) share "
                "their augmented batches and cannot each have a policy; drop member_policies or together/mutual.")
    return None


def cohort_cfgs(cfg: CnnCfg, first_seed: int) -> list[tuple[list[int], CnnCfg]]:
    """The networks of one backbone's ensemble as the cohorts they train in, each with the settings it trains with.

    With `together` (or `mutual`) every seed trains in one cohort on shared batches; otherwise each seed is a cohort
    of its own, trained with its `member_policies` entry as its augmentation policy when those are given: a mixed
    ensemble, whose members see their images differently (on kneeKL224 it did not beat one policy for all:
    docs/results.md).

    Raises:
        ConfigError: `member_policies` does not name one policy per seed, or is combined with a shared cohort.
    """
    problem = member_policy_problem(cfg)
    if problem:
        raise ConfigError(problem)
    seeds = [first_seed + k for k in range(max(1, cfg.ensemble_seeds))]
    if cfg.together or cfg.mutual:
        return [(seeds, cfg)]
    policies = cfg.member_policies or [cfg.augment_policy] * len(seeds)
    return [([seed], dataclasses.replace(cfg, augment_policy=policy))
            for seed, policy in zip(seeds, policies, strict=True)]
