"""The model package: one trained arm as a self-contained folder that `predict` and `serve` load.

```
MODEL_DIR/
  model.json          format, kind, arm, tasks and class names, decoding, localiser settings, kneeoa version, source
  weights/            the kind's weights (CNN: one safetensors + JSON per ensemble member; embed+XGBoost: one
                      booster JSON per task and the encoder reference)
  metrics.csv         the run's val and test metrics of this arm, with confidence intervals
  knee_check.safetensors  the knee check fitted on the run's training knees (`kneeoa.models.knee_check`)
  data_summary.json   the run's data report (counts, splits, quarantine)
  README.md           the model card
```

A package kind (`MODEL_KINDS`) says how to recognise its arms in a run folder, how to write their weights and how to
load them back as a `KneeModel`; a new kind of arm is one entry. The run folder is read only by `export_arm`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from kneeoa.config import Config
from kneeoa.config_checks import load_config
from kneeoa.errors import ConfigError, KneeoaError
from kneeoa.io import write_json, write_text
from kneeoa.models.knee_check import DEFAULT_ALPHA
from kneeoa.registry import Registry
from kneeoa.tasks import get_task

_logger = logging.getLogger(__name__)

FORMAT = "kneeoa-model/1"
MODEL_JSON = "model.json"
WEIGHTS_DIR = "weights"
KNEE_CHECK_FILE = "knee_check.safetensors"
CHECKSUMS = "checksums.json"
#: Keys every model.json must hold, whatever its kind.
REQUIRED_INFO = ("kind", "arm", "tasks", "localizer")


class PackageError(KneeoaError):
    """A model package is incomplete or does not reproduce its run (the message names the file and the fix)."""


class KneeModel(Protocol):
    """What `predict` and `serve` need from a loaded package, whatever its kind.

    `crops` are float32 (H, W) knee crops in [0, 1] in radiographic orientation; `sides` are "R" / "L" per crop
    (a model that was trained on mirrored left knees mirrors them itself).
    """

    info: dict[str, Any]
    knee_check: Any  # the fitted knee check (`kneeoa.models.knee_check`), or None; set by `load_model`

    def predict_proba(self, crops: list[np.ndarray], sides: list[str]) -> dict[str, np.ndarray]:
        """{task: (n, K) float probabilities}."""

    def features(self, crops: list[np.ndarray], sides: list[str]) -> np.ndarray:
        """(n, D) the features the model grades from (what the knee check scores)."""

    def decode(self, task: str, probs: np.ndarray) -> np.ndarray:
        """(n,) int classes from (n, K) probabilities, by the arm's own decoding (argmax or tuned cut-points)."""

    def cam(self, crop: np.ndarray, side: str, task: str, cls: int) -> np.ndarray | None:
        """(H, W) Grad-CAM map in [0, 1] over `crop` for class `cls`, or None when the kind has none."""


@dataclass(frozen=True)
class ModelKind:
    """One kind of packaged arm.

    Attributes:
        name: value of model.json's "kind".
        owns: (run_dir, arm, arm_record) -> whether this kind packages the arm.
        export: (run_dir, arm, cfg, weights_dir) -> the kind's entries of model.json ("tasks" with per-task
            "decoding", "preprocess", anything the loader needs); writes the weights into weights_dir.
        load: (model_dir, info, **options) -> KneeModel; options are load-time settings a kind may use
            (`encoder_weights`: where an embedding arm's encoder snapshot is on this machine).
    """

    name: str
    owns: Callable[[Path, str, dict[str, Any]], bool]
    export: Callable[[Path, str, Config, Path], dict[str, Any]]
    load: Callable[..., KneeModel]


MODEL_KINDS: Registry[ModelKind] = Registry("model kind")
MODEL_KINDS.add("cnn", "kneeoa.deploy.cnn_model:KIND")
MODEL_KINDS.add("embed_xgb", "kneeoa.deploy.boost_model:KIND")


def kneeoa_version() -> str:
    try:
        return version("kneeoa")
    except PackageNotFoundError:  # running from a source tree that was never installed
        from kneeoa import __version__

        return __version__


def _arm_record(run_dir: Path, arm: str) -> dict[str, Any]:
    path = run_dir / "arms" / f"{arm}.json"
    if not path.exists():
        known = sorted(p.stem for p in (run_dir / "arms").glob("*.json"))
        raise ConfigError(f"{run_dir} has no arm '{arm}' ({path} is missing). Arms of this run: "
                          f"{', '.join(known) or '(none)'}.")
    try:
        rec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): the arm record is damaged. Run the stage that made arm "
                          f"'{arm}' again (`kneeoa train` / `kneeoa boost RUN_DIR`).") from e
    if not isinstance(rec, dict) or rec.get("status") != "ran":
        raise ConfigError(f"Arm '{arm}' of {run_dir} did not run ({rec.get('reason', 'no reason recorded')}); "
                          "there is nothing to export.")
    return rec


def _kind_for(run_dir: Path, arm: str, record: dict[str, Any]) -> ModelKind:
    for name in MODEL_KINDS:
        kind = MODEL_KINDS.get(name)
        if kind.owns(run_dir, arm, record):
            return kind
    raise ConfigError(f"Arm '{arm}' of {run_dir} is not a kind that can be packaged; exportable kinds: "
                      f"{', '.join(MODEL_KINDS.names())} (CNN arms with checkpoints, and <encoder>_xgb arms).")


def _arm_metrics(run_dir: Path, arm: str) -> pd.DataFrame:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return pd.DataFrame()
    m = pd.read_csv(path)
    return m[(m["arm"] == arm) & m["split"].isin(["val", "test"])].reset_index(drop=True)


def _data_summary(run_dir: Path, tasks: list[str]) -> dict[str, Any]:
    """Images and patients per split and label counts per task, from the manifest, beside the run's data report."""
    from kneeoa.sources.manifest import read_manifest

    m = read_manifest(run_dir)
    report = run_dir / "data_report.json"
    return {"images_per_split": m["split"].value_counts().sort_index().to_dict(),
            "patients_per_split": m.groupby("split")["patient_id"].nunique().to_dict(),
            "labels_per_class": {t: {int(k): int(v) for k, v in m[t].value_counts().sort_index().items()}
                                 for t in tasks if t in m},
            "data_report": json.loads(report.read_text()) if report.exists() else None}


def _localizer(cfg: Config) -> dict[str, Any]:
    d = cfg.data
    return {"name": d.localizer, "crop_mm": d.crop_mm, "crop_px": d.image_size,
            "default_spacing_mm": d.default_spacing_mm}


def export_arm(run_dir: Path, arm: str, out: Path, *, overwrite: bool = False, card_notes: str = "",
               knee_check_alpha: float = DEFAULT_ALPHA) -> Path:
    """Write one trained arm of a run folder as a model package at `out`.

    Args:
        run_dir: a run folder whose arm ran (RUN_DIR/arms/<arm>.json says "ran").
        arm: the arm's name (`resnet18`, `raddino_xgb`, ...).
        out: the package folder to create; it is built beside `out` and moved into place when complete.
        overwrite: replace an existing package at `out`.
        card_notes: Markdown added to the model card (provenance, attribution, how to rebuild).
        knee_check_alpha: share of knees like the training ones that the package's knee check may refuse; it needs
            at least 1 / alpha calibration knees (a fifth of the training patients' knees), else the package gets no
            fitted check.

    Returns:
        `out`.

    Raises:
        ConfigError: unknown arm, an arm that did not run or cannot be packaged, `out` exists without `overwrite`.
    """
    from kneeoa.deploy.model_card import model_card

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists. Choose another --out or pass --overwrite.")
    record = _arm_record(run_dir, arm)
    kind = _kind_for(run_dir, arm, record)
    cfg = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else Config()
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / WEIGHTS_DIR).mkdir(parents=True)
    try:
        entries = kind.export(run_dir, arm, cfg, tmp / WEIGHTS_DIR)
        info = {"format": FORMAT, "kind": kind.name, "arm": arm, "kneeoa_version": kneeoa_version(),
                "localizer": _localizer(cfg),
                "source": {"run_dir": str(run_dir.resolve()), "study": cfg.name, "seed": cfg.seed,
                           "weights": record.get("weights", "")},
                **entries}
        info["knee_check"] = fit_knee_check(kind.load(tmp, info), run_dir, tmp, seed=cfg.seed,
                                            alpha=knee_check_alpha)
        write_json(info, tmp / MODEL_JSON)
        metrics = _arm_metrics(run_dir, arm)
        metrics.to_csv(tmp / "metrics.csv", index=False)
        summary = _data_summary(run_dir, list(info["tasks"]))
        write_json(summary, tmp / "data_summary.json")
        write_text(model_card(info, metrics, summary, notes=card_notes), tmp / "README.md")
        write_json(checksums(tmp), tmp / CHECKSUMS)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _logger.info("exported %s (%s) -> %s", arm, kind.name, out)
    return out


def task_entry(task: str, decoding: dict[str, Any]) -> dict[str, Any]:
    """model.json's description of one task: class names and how probabilities become a class."""
    t = get_task(task)
    return {"kind": t.kind, "classes": list(t.classes), "decoding": decoding}


def read_info(model_dir: Path) -> dict[str, Any]:
    """model.json of a package, checked for its format.

    Raises:
        ConfigError: no model.json (not a package) or a format this kneeoa does not read.
    """
    path = Path(model_dir) / MODEL_JSON
    if not path.exists():
        raise ConfigError(f"{model_dir} is not a kneeoa model package ({MODEL_JSON} is missing). Make one with "
                          "`kneeoa export RUN_DIR --arm ARM --out MODEL_DIR`.")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}). Export the package again.") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise ConfigError(f"{path} has format {found!r}; this kneeoa reads {FORMAT!r}. Export the "
                          f"package again with kneeoa {kneeoa_version()}.")
    missing = [key for key in REQUIRED_INFO if key not in info]
    if missing:
        raise PackageError(f"{path} lacks {', '.join(repr(k) for k in missing)}: the package is incomplete. Export "
                           "it again (`kneeoa export RUN_DIR --arm ARM --out MODEL_DIR`).")
    return info


def fit_knee_check(model: KneeModel, run_dir: Path, out_dir: Path, *, seed: int = 0, alpha: float = DEFAULT_ALPHA
                   ) -> dict[str, Any]:
    """Fit the knee check on the run's training knees through `model`'s own features; write it into `out_dir`.

    Returns:
        model.json's "knee_check" entry: the method and its settings, or {"method": "none", "reason": ...} when the
        run has too few training knees to fit one (the package then grades with the tag and pixel rules only).
    """
    from safetensors.numpy import save_file
    from tqdm.auto import tqdm

    from kneeoa.formats.images import load_gray
    from kneeoa.models.knee_check import FILM_COPIES, KNEE_CHECKS, film_like, layout, right_knees
    from kneeoa.sources.manifest import read_manifest, resolve_image_path

    method = KNEE_CHECKS.get("layout_features")
    train = read_manifest(run_dir).query("split == 'train'")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {}
    films: list[np.ndarray] = []
    film_groups: list[np.ndarray] = []
    for start in tqdm(range(0, len(train), 256), desc="fitting the knee check", leave=False):
        rows = train.iloc[start:start + 256]
        crops = [load_gray(resolve_image_path(run_dir, p)) for p in rows["image_path"]]
        for view, x in method.describe(crops, list(rows["side"]), model.features).items():
            parts.setdefault(view, []).append(x)
        right = right_knees(crops, list(rows["side"]))
        for _ in range(FILM_COPIES):
            films.append(np.stack([layout(film_like(c, rng)) for c in right]))
            film_groups.append(rows["patient_id"].to_numpy())
    try:
        check = method.fit({v: np.concatenate(x) for v, x in parts.items()}, train["patient_id"].to_numpy(),
                           film_layouts=np.concatenate(films) if films else None,
                           film_groups=np.concatenate(film_groups) if films else None, seed=seed, alpha=alpha)
    except ValueError as e:
        _logger.warning("no knee check in this package: %s", e)
        return {"method": "none", "reason": str(e)}
    arrays, meta = check.state()
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()},
              str(Path(out_dir) / KNEE_CHECK_FILE))
    return {**meta, "fitted_on": f"{len(train)} training knees of {train['patient_id'].nunique()} patients"}


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(model_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of a package (relative path -> hex digest), written at export as checksums.json."""
    root = Path(model_dir)
    return {p.relative_to(root).as_posix(): _sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != CHECKSUMS}


def verify_checksums(model_dir: Path) -> None:
    """Check every file listed in the package's checksums.json (packages exported before it existed have none).

    Raises:
        PackageError: a listed file is missing or its content changed since export.
    """
    path = Path(model_dir) / CHECKSUMS
    if not path.exists():
        return
    try:
        listed = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PackageError(f"{path} is not valid JSON ({e}). Export the package again.") from e
    for name, digest in listed.items():
        file = Path(model_dir) / name
        if not file.is_file():
            raise PackageError(f"Model package {model_dir} lacks {name} (listed in {CHECKSUMS}). Export it again.")
        if _sha256(file) != digest:
            raise PackageError(f"Model package {model_dir}: {name} changed since export (its SHA-256 is not the one "
                               f"in {CHECKSUMS}): the file is damaged. Export the package again.")


def load_knee_check(model_dir: Path, info: dict[str, Any]):
    """The package's fitted knee check, or None when the package has none (exported before it existed, or from a
    run too small to fit one).

    Raises:
        PackageError: model.json names a check whose file is missing.
    """
    from safetensors.numpy import load_file

    from kneeoa.models.knee_check import KNEE_CHECKS

    entry = info.get("knee_check") or {"method": "none"}
    if entry.get("method", "none") == "none":
        return None
    path = Path(model_dir) / KNEE_CHECK_FILE
    if not path.exists():
        raise PackageError(f"Model package {model_dir} lacks {path} (model.json names a "
                           f"{entry['method']!r} knee check). Export the package again.")
    return KNEE_CHECKS.get(entry["method"]).from_state(load_file(str(path)), entry)


def load_model(model_dir: Path, *, encoder_weights: Path | None = None) -> KneeModel:
    """Load a model package for inference (weights, preprocessing, decoding, knee check), after checking every
    file against the checksums written at export; nothing from the run folder.

    Args:
        model_dir: the package folder `export_arm` wrote.
        encoder_weights: embedding arms only: the encoder snapshot folder on this machine (default: where the run
            loaded it from).
    """
    info = read_info(model_dir)
    verify_checksums(model_dir)
    model = MODEL_KINDS.get(info["kind"]).load(Path(model_dir), info, encoder_weights=encoder_weights)
    model.knee_check = load_knee_check(model_dir, info)
    return model
