"""Whole-config validation before any stage runs: names against the registries, allowed words, ranges.

`kneeoa.config` checks the shape of a config (known keys, types); this module checks its meaning, declared as data
(`CHECKS`), so that a task typo or `epochs: -3` fails at once with the key, the bad value and the valid choices or
range, instead of after an hour of training. A check names the registry whose entries are the valid values (`OneOf`,
by the registry's kind in `REGISTRIES`); the registries are imported only when a config is validated and read then,
so an entry registered at run time or by a plugin (a toy importer in a test, a site's own backbone) is valid too.
`load_config` reads a study YAML and validates it whole: the one way a config enters from a file.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

import yaml

from kneeoa.config import Config, backbone_cfg, config_from_dict, member_policy_problem
from kneeoa.errors import ConfigError
from kneeoa.registry import Registry

#: The registries config values name entries of, by their kind (lazy: imported when a config is validated).
REGISTRIES: Registry[Registry] = Registry("registry", entry_type=Registry)
REGISTRIES.add("stage", "kneeoa.stages:STAGES")
REGISTRIES.add("importer", "kneeoa.sources.importers:IMPORTERS")
REGISTRIES.add("localizer", "kneeoa.localize.core:LOCALIZERS")
REGISTRIES.add("task", "kneeoa.tasks:TASKS")
REGISTRIES.add("backbone", "kneeoa.models.cnn.backbones:BACKBONES")
REGISTRIES.add("output head", "kneeoa.models.cnn.heads:HEADS")
REGISTRIES.add("augmentation policy", "kneeoa.transforms.augment:POLICIES")
REGISTRIES.add("encoder", "kneeoa.models.encoders.foundation:ENCODERS")
REGISTRIES.add("fusion method", "kneeoa.stages.fusion:METHODS")
REGISTRIES.add("embedding head", "kneeoa.models.probes:HEADS")
REGISTRIES.add("pretraining method", "kneeoa.stages.pretrain:METHODS")
REGISTRIES.add("metric", "kneeoa.stats.metrics:METRICS")


@dataclass(frozen=True)
class OneOf:
    """The value (each element of a list, each key of a mapping) must be a registered name or one of `words`.

    Attributes:
        registry: the kind of entry the value names (a `REGISTRIES` name); None: `words` only.
        words: fixed choices, listed before the registry's names.
        where: only the registry's entries it holds for (e.g. the binarised tasks); None: every entry.
    """

    registry: str | None = None
    words: tuple[str, ...] = ()
    where: Callable[[Any], bool] | None = None

    def choices(self) -> list[str]:
        names = list(self.words)
        if self.registry:
            registry = REGISTRIES.get(self.registry)
            listed = registry.names() if self.where is None else [n for n, e in registry.items() if self.where(e)]
            names += [n for n in listed if n not in names]
        return names

    def problems(self, key: str, value: Any) -> list[str]:
        items = list(value) if isinstance(value, list | tuple | dict) else [value]
        valid = self.choices()
        lowered = {v.lower() for v in valid}
        out = []
        for item in (i for i in items if str(i).lower() not in lowered):
            near = difflib.get_close_matches(str(item).lower(), list(lowered), n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            out.append(f"{key}: {item!r} is not one of: {', '.join(valid)}.{hint}")
        return out


@dataclass(frozen=True)
class Range:
    """A number (each element of a list) within [lo, hi]; `open_lo`/`open_hi` exclude the bound. None passes."""

    lo: float = -math.inf
    hi: float = math.inf
    open_lo: bool = False
    open_hi: bool = False

    def describe(self) -> str:
        left = f"{'(' if self.open_lo else '['}{self.lo:g}"
        right = f"{self.hi:g}{')' if self.open_hi else ']'}"
        return f"{left}, {right}"

    def problems(self, key: str, value: Any) -> list[str]:
        out = []
        for v in (value if isinstance(value, list | tuple) else [value]):
            if v is None:
                continue
            low_ok = v > self.lo if self.open_lo else v >= self.lo
            high_ok = v < self.hi if self.open_hi else v <= self.hi
            if not (low_ok and high_ok and math.isfinite(v)):
                out.append(f"{key}: {v!r} is outside the allowed range {self.describe()}.")
        return out


POSITIVE = Range(0, open_lo=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
SHARE = Range(0, 1)

CNN_CHECKS: dict[str, OneOf | Range] = {
    "backbones": OneOf("backbone"),
    "image_size": Range(16),
    "epochs": AT_LEAST_ONE,
    "batch_size": AT_LEAST_ONE,
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "label_smoothing": Range(0, 1, open_hi=True),
    "mixup": NON_NEGATIVE,
    "class_balance": OneOf(words=("none", "weighted_loss", "balanced_sampling")),
    "class_weight_power": NON_NEGATIVE,
    "klg_head": OneOf("output head"),
    "klg_decode": OneOf(words=("argmax", "cutpoints")),
    "cutpoint_bootstrap": NON_NEGATIVE,
    "cutpoint_accuracy_weight": NON_NEGATIVE,
    "select_by": OneOf(words=("metric", "loss")),
    "patience": NON_NEGATIVE,
    "max_minutes": POSITIVE,
    "augment_policy": OneOf("augmentation policy"),
    "member_policies": OneOf("augmentation policy"),
    "augment_group": Range(1, 4),
    "hflip": OneOf(words=("auto", "true", "false")),
    "ema": Range(0, 1, open_lo=True, open_hi=True),
    "ensemble_seeds": AT_LEAST_ONE,
    "mutual": NON_NEGATIVE,
    "weights": OneOf("backbone"),
    "overrides": OneOf("backbone"),
    "num_nodes": AT_LEAST_ONE,
    "num_workers": NON_NEGATIVE,
    "max_train_images": AT_LEAST_ONE,
    "channels_last": OneOf(words=("auto", "true", "false")),
}

# Config key (dotted) -> its check. Lists are checked element by element, mappings by their keys.
CHECKS: dict[str, OneOf | Range] = {
    "stages": OneOf("stage"),
    "data.source": OneOf("importer", words=("manifest",)),
    "data.patients": AT_LEAST_ONE,
    "data.visits": Range(1, 7),
    "data.image_size": Range(16),
    "data.low_quality_share": SHARE,
    "data.crop_mm": POSITIVE,
    "data.split_fractions": SHARE,
    "data.workers": AT_LEAST_ONE,
    "data.localizer": OneOf("localizer"),
    "data.default_spacing_mm": POSITIVE,
    "data.csv_kind": OneOf(words=("auto", "crop", "single", "bilateral")),
    "tasks.names": OneOf("task"),
    "tasks.thresholds": OneOf("task", where=attrgetter("binarised")),
    **{f"cnn.{k}": v for k, v in CNN_CHECKS.items()},
    "foundation.encoders": OneOf("encoder"),
    "foundation.weights": OneOf("encoder"),
    "foundation.device": OneOf(words=("auto", "cpu", "cuda", *(f"cuda:{i}" for i in range(16)))),
    "foundation.batch_size": AT_LEAST_ONE,
    "foundation.features": OneOf("encoder"),
    "foundation.precision": OneOf(words=("auto", "bf16", "fp32")),
    "foundation.linear_c_grid": POSITIVE,
    "foundation.xgb_n_estimators": AT_LEAST_ONE,
    "foundation.xgb_early_stopping": AT_LEAST_ONE,
    "foundation.xgb_max_bin": Range(2),
    "foundation.n_jobs": AT_LEAST_ONE,
    "zeroshot.encoder": OneOf("encoder"),
    "stats.n_boot": AT_LEAST_ONE,
    "stats.confidence": Range(0, 1, open_lo=True, open_hi=True),
    "stats.calibration_bins": AT_LEAST_ONE,
    "stats.compare_split": OneOf(words=("train", "val", "test")),
    "stats.compare_metrics": OneOf(words=("binary", "ordinal")),
    "explain.per_grade": NON_NEGATIVE,
    "explain.max_score_images": AT_LEAST_ONE,
    "explain.pointing_tolerance": SHARE,
    "explain.batch_size": AT_LEAST_ONE,
    "explain.cam_layer": OneOf(words=("penultimate", "last")),
    "explain.split": OneOf(words=("train", "val", "test")),
    "explain.occlusion_images": NON_NEGATIVE,
    "explain.occlusion_patch": Range(0, 1, open_lo=True),
    "explain.occlusion_stride": Range(0, 1, open_lo=True),
    "explain.occlusion_batch": AT_LEAST_ONE,
    "fusion.methods": OneOf("fusion method"),
    "fusion.folds": Range(2),
    "fusion.stack_c": POSITIVE,
    "fusion.heads": OneOf("embedding head"),
    "pretrain.backbone": OneOf("backbone"),
    "pretrain.method": OneOf("pretraining method"),
    "pretrain.image_size": Range(16),
    "pretrain.epochs": AT_LEAST_ONE,
    "pretrain.batch_size": Range(2),
    "pretrain.lr": POSITIVE,
    "pretrain.weight_decay": NON_NEGATIVE,
    "pretrain.temperature": POSITIVE,
    "pretrain.max_minutes": POSITIVE,
    "pretrain.splits": OneOf(words=("train", "val", "test")),
    "pretrain.checkpoint_every_s": NON_NEGATIVE,
}


def _lookup(cfg: Any, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _cross_checks(cfg: Any) -> Iterable[str]:
    """Rules that span keys or look inside mappings: split shares, thresholds, compared metrics."""
    fractions = cfg.data.split_fractions
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6:
        yield f"data.split_fractions: {fractions!r} must be three shares (train, val, test) summing to 1."
    check = str(cfg.data.knee_check)
    if check not in ("builtin", "none"):
        from kneeoa.builtin import names

        if check not in names() and not (Path(check) / "model.json").is_file():
            yield (f"data.knee_check: {check!r} is neither builtin, none, a built-in grader "
                   f"({', '.join(names()) or 'none installed'}) nor a model package folder (with model.json).")
    for task, grade in cfg.tasks.thresholds.items():
        if grade not in (1, 2, 3):
            yield f"tasks.thresholds.{task}: {grade!r} is not an OARSI grade 1, 2 or 3."
    from kneeoa.sources.importers import option_problems

    yield from option_problems(cfg.data.options)
    from kneeoa.models.encoders.foundation import ENCODERS

    for encoder, choice in cfg.foundation.features.items():
        if encoder in ENCODERS:
            yield from OneOf(words=tuple(ENCODERS.get(encoder).features)).problems(
                f"foundation.features.{encoder}", choice)
    if "fusion" in cfg.stages and len(set(cfg.fusion.arms)) < 2:
        yield (f"fusion.arms: {cfg.fusion.arms!r} names fewer than two arms; the fusion stage in `stages` needs two "
               "or more members (e.g. [resnet18, biomedclip_xgb]).")
    fused = [a for a in cfg.fusion.arms if a.startswith("fusion_")]
    if fused:
        yield f"fusion.arms: {fused[0]!r} is a fused arm; members must be arms that other stages make."
    for backbone in cfg.cnn.backbones:
        try:
            hp = backbone_cfg(cfg.cnn, backbone)
        except ConfigError:
            continue  # reported by _override_problems
        if hp.mutual and hp.ensemble_seeds < 2:
            yield (f"cnn.mutual: {hp.mutual!r} for {backbone} needs cnn.ensemble_seeds of 2 or more (got "
                   f"{hp.ensemble_seeds}): mutual learning trains the seeds of an ensemble together.")
        problem = member_policy_problem(hp)
        if problem:
            yield f"{problem} ({backbone})"
    metrics = OneOf("metric")
    for kind, names in cfg.stats.compare_metrics.items():
        yield from metrics.problems(f"stats.compare_metrics.{kind}", names)


def config_problems(cfg: Any) -> list[str]:
    """Every problem of a loaded Config, one line each ("key: value ... valid choices/range"); empty when valid."""
    out = []
    for key, check in CHECKS.items():
        out += check.problems(key, _lookup(cfg, key))
    out += list(_cross_checks(cfg))
    return out + list(_override_problems(cfg))


def _override_problems(cfg: Any) -> Iterable[str]:
    """The per-backbone `cnn.overrides` values, checked like the common cnn keys."""

    for backbone, over in cfg.cnn.overrides.items():
        try:
            hp = backbone_cfg(cfg.cnn, backbone)
        except ConfigError as e:
            yield str(e)
            continue
        for key in (k for k in CNN_CHECKS if k in over):
            yield from CNN_CHECKS[key].problems(f"cnn.overrides.{backbone}.{key}", getattr(hp, key))


def validate_config(cfg: Any, where: str = "config") -> Any:
    """Raise ConfigError listing every problem of `cfg` (see `config_problems`); return `cfg` when it is valid."""
    problems = config_problems(cfg)
    if problems:
        lines = "\n  ".join(problems)
        raise ConfigError(f"{where} has {len(problems)} problem(s):\n  {lines}")
    return cfg


def load_config(path: Path) -> Config:
    """Read a study YAML (a partial config: missing keys keep their defaults) and validate it whole.

    Raises:
        ConfigError: the file is missing, empty, not UTF-8, not YAML, not a mapping, or a key's type, name or range
            is invalid (see `CHECKS`); the message names the file and every bad key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path} is not UTF-8 text (byte {raw[e.start]:#04x} on line {line}). Save it as UTF-8."
                          ) from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if data is None:
        raise ConfigError(f"{path} is empty: a study config names at least what differs from the defaults (e.g. "
                          "`data: {source: folders, path: ...}`). To run the built-in default study on purpose, use "
                          "`kneeoa demo`.")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a YAML {type(data).__name__} ({str(data)[:40]!r}); a study config is a "
                          "mapping of sections (`data:`, `tasks:`, `cnn:`, ...) to their keys.")
    return validate_config(config_from_dict(data, where=str(path)), where=str(path))
