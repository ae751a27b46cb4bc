"""Built-in graders: model packages shipped inside kneeoa as package data, so grading needs no training run.

Each built-in is an ordinary model package (`kneeoa.deploy.package`) under `kneeoa/builtin/<name>/`, plus
`reference/val_predictions.csv`: the run's own validation probabilities, which the package must reproduce to
`REPRODUCE_TOL` (checked when it is built, and by the test suite on the real crops). `resolve_model` turns what a user
names (nothing, a built-in's name, or a package folder) into a package folder; `build_builtin` rebuilds a built-in
from a recipe run in one step:

    kneeoa export RUN_DIR --arm twobranch_ens --builtin twobranch-kneekl224
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from kneeoa import builtin as shipped
from kneeoa.errors import ConfigError

_logger = logging.getLogger(__name__)

#: The grader `predict`, `serve` and `kneeoa.load_model()` use when no model is named.
DEFAULT_MODEL = "twobranch-kneekl224"
#: Largest probability difference allowed between a built-in and the run it was built from, on the run's val crops.
REPRODUCE_TOL = 1e-5
REFERENCE = Path("reference") / "val_predictions.csv"
#: Metrics `kneeoa models list` shows for a built-in (the rest are in its model card).
HEADLINE_METRICS = ("kappa_quadratic", "accuracy", "auc", "balanced_accuracy")
#: Data attribution written into a built-in's model card, by data folder name.
ATTRIBUTIONS = {"kneeKL224": """\
- **kneeKL224**: Chen P. (2018), "Knee Osteoarthritis Severity Grading Dataset", Mendeley Data V1,
  doi:10.17632/56rmx5bjcr.1 (`KneeXrayData/ClsKLData/kneeKL224`), CC BY 4.0: 224x224 8-bit knee crops from
  Osteoarthritis Initiative (OAI) baseline bilateral PA fixed-flexion radiographs, KL grades from the OAI central
  readings. Trained on its train split (5,778 knees, 2,889 patients), every choice made on its val split (826 knees,
  413 patients); both knees of a patient are always in one split.
- Cite Chen P, Gao L, Shi X, Allen K, Yang L, "Fully automatic knee osteoarthritis severity grading using deep
  neural networks with a novel ordinal loss", Comput Med Imaging Graph 75 (2019) 84-92, and acknowledge the OAI:
  "The Osteoarthritis Initiative is a public-private partnership (contracts N01-AR-2-2258, N01-AR-2-2259,
  N01-AR-2-2260, N01-AR-2-2261, N01-AR-2-2262) funded by the NIH; this work used its publicly available data."
- Limits of the data: KL grades only (no OARSI features); one population (OAI, US, 45-79 years, at risk of or with
  knee OA) and one protocol (PA fixed flexion)."""}


def builtin_root() -> Path:
    """The folder holding the built-in packages (`kneeoa.builtin.root`)."""
    return shipped.root()


def builtin_names() -> list[str]:
    """Names of the built-in graders (`kneeoa.builtin.names`)."""
    return shipped.names()


def resolve_model(name_or_path: str | Path | None = None) -> Path:
    """The package folder for a model given by name or path; None means `DEFAULT_MODEL`.

    A folder holding model.json is taken as it is; otherwise the name must be a built-in.

    Raises:
        ConfigError: neither a package folder nor a built-in name (the message lists the built-ins).
    """
    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    path = Path(name).expanduser()
    if (path / "model.json").is_file():
        return path
    if name in builtin_names():
        return builtin_root() / name
    known = ", ".join(builtin_names()) or "(none installed)"
    if path.exists():
        raise ConfigError(f"{path} is not a kneeoa model package (no model.json). Give a folder made by `kneeoa "
                          f"export`, or a built-in grader: {known}.")
    raise ConfigError(f"No model package or built-in grader named {name!r}. Built-ins: {known}; or give the folder "
                      "of a package made by `kneeoa export RUN_DIR --arm ARM --out MODEL_DIR`.")


def builtin_table() -> list[tuple[str, str, str, str, str]]:
    """One row per built-in: name (marked when default), tasks, val figures with CIs, knee check, folder."""
    from kneeoa.deploy.package import read_info

    rows = []
    for name in builtin_names():
        folder = builtin_root() / name
        info = read_info(folder)
        metrics = pd.read_csv(folder / "metrics.csv") if (folder / "metrics.csv").exists() else pd.DataFrame()
        val = metrics[metrics["split"] == "val"] if len(metrics) else metrics
        figures = "; ".join(
            f"{r.task} {r.metric} {r.value:.3f}" + (f" [{r.ci_low:.3f}, {r.ci_high:.3f}]" if pd.notna(r.ci_low) else "")
            for r in val.itertuples() if r.metric in HEADLINE_METRICS) or "no metrics recorded"
        check = info.get("knee_check") or {"method": "none"}
        rows.append((name + (" (default)" if name == DEFAULT_MODEL else ""), ", ".join(info["tasks"]), figures,
                     f"{check['method']}, alpha {check['alpha']}" if "alpha" in check else "none", str(folder)))
    return rows


def _val_reference(run_dir: Path, arm: str, data_root: Path | None) -> pd.DataFrame:
    """The run's val probabilities of `arm` for every task, one row per knee, with the crop's file and side."""
    from kneeoa.runfolder.predictions import read_predictions
    from kneeoa.sources.manifest import read_manifest, resolve_image_path

    manifest = read_manifest(run_dir).set_index("image_id")
    out = None
    for path in sorted((Path(run_dir) / "predictions").glob(f"{arm}__*.parquet")):
        _, task, table = read_predictions(path)
        table = table.query("split == 'val'")
        cols = [c for c in table.columns if c.startswith("prob_")]
        probs = table[cols].rename(columns={c: f"{task}_p{c.removeprefix('prob_')}" for c in cols})
        part = pd.concat([table[["image_id"]], probs], axis=1)
        out = part if out is None else out.merge(part, on="image_id")
    if out is None or out.empty:
        raise ConfigError(f"{run_dir} has no val predictions of arm '{arm}' (predictions/{arm}__<task>.parquet). "
                          "Run the train stage first.")
    files = [resolve_image_path(run_dir, manifest.at[i, "image_path"]) for i in out["image_id"]]
    out.insert(1, "file", [os.path.relpath(f, data_root) if data_root else str(f) for f in files])
    out.insert(2, "side", [manifest.at[i, "side"] for i in out["image_id"]])
    return out


def reproduce(model_dir: Path, reference: pd.DataFrame, data_root: Path | None) -> float:
    """Largest absolute difference between `reference`'s probabilities and the package's, grading its crops as
    `kneeoa predict` does, with the knee check's refusals off (every crop is graded)."""
    import tempfile

    from kneeoa.deploy.inputs import InputFile
    from kneeoa.deploy.package import load_model
    from kneeoa.deploy.predict import predict_files

    model = load_model(model_dir)
    items = [InputFile(Path(data_root) / f if data_root else Path(f), "crop", s)
             for f, s in zip(reference["file"], reference["side"], strict=True)]
    with tempfile.TemporaryDirectory(prefix="kneeoa-reproduce-") as tmp:
        got = predict_files(model, items, Path(tmp), knee_check=False, progress=False)
    cols = [c for c in reference.columns if "_p" in c]
    return float(np.max(np.abs(got[cols].to_numpy(float) - reference[cols].to_numpy(float))))


def build_builtin(run_dir: Path, arm: str, name: str, *, card_notes: str = "") -> Path:
    """Export `arm` of a recipe run as the built-in grader `name`, replacing it, and check that it reproduces the
    run's val probabilities to `REPRODUCE_TOL`.

    Raises:
        PackageError: the exported package does not reproduce the run (nothing is replaced).
    """
    import shutil

    from kneeoa.config_checks import load_config
    from kneeoa.deploy.package import PackageError, export_arm

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    data_root = Path(cfg.data.path).resolve() if cfg.data.path else None
    reference = _val_reference(run_dir, arm, data_root)
    target = builtin_root() / name
    staged = builtin_root() / f".{name}.new"
    shutil.rmtree(staged, ignore_errors=True)
    export_arm(run_dir, arm, staged, card_notes=card_notes)
    (staged / REFERENCE).parent.mkdir(parents=True, exist_ok=True)
    reference.to_csv(staged / REFERENCE, index=False, float_format="%.17g")
    diff = reproduce(staged, reference, data_root)
    if diff > REPRODUCE_TOL:
        shutil.rmtree(staged, ignore_errors=True)
        raise PackageError(f"The package of {arm} differs from {run_dir}'s val predictions by up to {diff:.2e} "
                           f"(allowed {REPRODUCE_TOL:g}); the built-in {name!r} was not replaced.")
    shutil.rmtree(target, ignore_errors=True)
    staged.rename(target)
    _logger.info("built-in %s <- %s %s (val probabilities reproduced to %.1e)", name, run_dir, arm, diff)
    return target


def builtin_notes(run_dir: Path, arm: str, name: str) -> str:
    """The built-in's model-card section: data and attribution, how it was checked, and how to rebuild it."""
    from kneeoa.config_checks import load_config

    cfg = load_config(Path(run_dir) / "config.yaml")
    source = Path(cfg.data.path or "") / "SOURCE.md"
    attribution = (ATTRIBUTIONS.get(Path(cfg.data.path or "").name) or
                   (source.read_text(encoding="utf-8").strip() if source.is_file() else
                    f"(no SOURCE.md beside the data at {cfg.data.path})"))
    return f"""
## Built-in grader `{name}`

Shipped inside kneeoa: `kneeoa predict`, `kneeoa serve` and `kneeoa.load_model()` use it when no model is named.
Built from arm `{arm}` of the recipe run `{Path(run_dir).name}` (study `{cfg.name}`, seed {cfg.seed}); the val
figures above are that run's, with patient-bootstrap 95% CIs. Every choice was made on val; the data's test split
was not read. Loaded from the package it reproduces the run's val probabilities to {REPRODUCE_TOL:g}
(`{REFERENCE.as_posix()}` holds them, and the test suite checks it on the real crops).

Rebuild it from a recipe run, in one step (a better recipe replaces it the same way):

    kneeoa run examples/kneekl224.yaml --out runs/kneekl224
    kneeoa export runs/kneekl224 --arm {arm} --builtin {name}

### Training data and attribution

{attribution}
"""
