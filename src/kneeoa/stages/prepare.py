"""Stage `prepare`: run the configured importer, assign splits by patient, derive task labels, write the manifest
and the data report (counts per split / grade / visit, quarantined items with reasons, files not used with reasons,
unmatched readings and images, label missingness per task).

Film imports (OAI, CSV) record each finished film under RUN_DIR/.prepare/, so the same command rerun after a kill
continues where it stopped (and says so); the record is removed when the import completes. A new prepare replaces
the previous one whole: the quarantine and skipped tables are rewritten or removed, crops and masks that the new
manifest does not list are deleted, and RUN_DIR/config.yaml records the config used (source and path included), so
a following `kneeoa train RUN_DIR` trains on what was imported, with the same settings.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kneeoa.config import Config, dump_config
from kneeoa.errors import DataError
from kneeoa.io import write_parquet, write_text
from kneeoa.runfolder.manifest import (
    DATA_REPORT,
    PREPARE_JOURNAL,
    QUARANTINE,
    SKIPPED,
    import_target,
    write_data_report,
)
from kneeoa.runlock import run_lock
from kneeoa.sources.importers import ImportResult, ImportTarget, get_importer
from kneeoa.sources.manifest import mark_mirrored, validate_manifest, write_manifest
from kneeoa.sources.splits import assign_splits
from kneeoa.tasks import TASKS, add_task_labels, primary_task

_logger = logging.getLogger(__name__)

__all__ = ["DATA_REPORT", "data_report", "prepare", "run"]


def data_report(manifest: pd.DataFrame, result: ImportResult, task_names: list[str]) -> dict[str, Any]:
    """Counts and losses of one import, as written to RUN_DIR/data_report.json."""
    counts = {"images": len(manifest), "patients": int(manifest["patient_id"].nunique()),
              "per_split": manifest["split"].value_counts().sort_index().to_dict(),
              "per_visit": manifest["visit"].value_counts().sort_index().to_dict(),
              "low_quality": int(manifest["low_quality"].sum()),
              "quarantined": len(result.quarantine), "skipped": len(result.skipped)}
    per_grade = {}
    for name in [primary_task(), *task_names]:
        if name in manifest and name in TASKS and manifest[name].notna().any():
            table = pd.crosstab(manifest[name], manifest["split"])
            per_grade[name] = {str(int(k)): v for k, v in table.to_dict(orient="index").items()}
    missing = {name: (float(manifest[name].isna().mean()) if name in manifest else 1.0) for name in task_names}
    knee_check = None
    if "not_knee" in manifest:
        flagged = manifest[manifest["not_knee"]]
        knee_check = {"checked": len(manifest), "not_knee": len(flagged),
                      "per_split": flagged["split"].value_counts().sort_index().to_dict(),
                      "images": flagged[["image_id", "split", "image_path", "knee_score"]].head(200)
                      .to_dict(orient="records")}
    return {"counts": counts, "per_grade": per_grade, "label_missing_share": missing, "knee_check": knee_check,
            "quarantine": result.quarantine.to_dict(orient="records"),
            "skipped": result.skipped.to_dict(orient="records"),
            "unmatched": result.unmatched.to_dict(orient="records"), "notes": result.notes}


def _nothing_kept(result: ImportResult, origin: str) -> DataError:
    reasons = result.quarantine["reason"].astype(str).value_counts().head(3)
    listed = "; ".join(f"{n} x {r}" for r, n in reasons.items()) or "the source lists no images"
    return DataError(f"{origin} kept no image ({len(result.quarantine)} quarantined, {len(result.skipped)} file(s) "
                     f"not used). Most common reasons: {listed}. Fix the source and run prepare again.")


def _write_table(table: pd.DataFrame, path: Path) -> None:
    """Write a loss table, or remove the previous import's when this import has none."""
    if len(table):
        write_parquet(table.astype(str), path)
    else:
        path.unlink(missing_ok=True)


def _remove_unlisted(target: ImportTarget, manifest: pd.DataFrame) -> int:
    """Delete crops and masks of an earlier import that the new manifest does not list; returns how many."""
    listed = {str((target.root / p).resolve()) for col in ("image_path", "mask_path") if col in manifest
              for p in manifest[col].dropna().astype(str)}
    removed = 0
    for folder in (target.crops_dir, target.masks_dir):  # files the importers write, one per manifest row
        for path in folder.glob("*") if folder.is_dir() else []:
            if path.is_file() and str(path.resolve()) not in listed:
                path.unlink()
                removed += 1
    return removed


def knee_check_columns(df: pd.DataFrame, run_dir: Path, check: str) -> pd.DataFrame:
    """The manifest with `knee_score` (0-1) and `not_knee` (the check would refuse it) from a grader's knee check.

    `check` is "none" (columns left out), "builtin" (the default built-in grader), a built-in's name or a model
    package folder. Flagged images stay in the manifest: the data report shows them, nothing drops them.

    Raises:
        ConfigError: no such grader, or one without a fitted knee check.
    """
    from tqdm.auto import tqdm

    from kneeoa.deploy.builtin import resolve_model
    from kneeoa.deploy.package import load_model
    from kneeoa.errors import ConfigError
    from kneeoa.sources.manifest import resolve_image_path

    if check == "none":
        return df
    model_dir = resolve_model(None if check == "builtin" else check)
    model = load_model(model_dir)
    if model.knee_check is None:
        raise ConfigError(f"data.knee_check: {check!r} ({model_dir}) has no fitted knee check; name another "
                          "grader or set data.knee_check: none.")
    from kneeoa.formats.images import load_gray

    scores = []
    for start in tqdm(range(0, len(df), 256), desc="knee check", leave=False):
        rows = df.iloc[start:start + 256]
        crops = [load_gray(resolve_image_path(run_dir, p)) for p in rows["image_path"]]
        scores.append(model.knee_check.scores(crops, list(rows["side"]), model.features))
    df = df.copy()
    df["knee_score"] = np.concatenate(scores) if scores else np.zeros(0)
    df["not_knee"] = df["knee_score"] < model.knee_check.threshold
    if df["not_knee"].any():
        _logger.warning("knee check (%s): %d of %d image(s) unlike the knees it was fitted on (manifest column "
                        "not_knee; listed in the data report)", model.info["arm"], int(df["not_knee"].sum()), len(df))
    return df


def prepare(run_dir: Path, cfg: Config, source: str | None = None, path: str | Path | None = None) -> pd.DataFrame:
    """Import `source` (default cfg.data.source) from `path` into RUN_DIR/manifest.parquet; returns the manifest.

    Raises:
        DataError: the importer kept no image (the message gives the commonest quarantine reasons).
        ManifestError, LeakageError: the imported rows break the manifest contract.
        RunFolderBusyError: another process writes into `run_dir`.
    """
    run_dir = Path(run_dir)
    source = source or cfg.data.source
    path = path if path is not None else cfg.data.path
    origin = f"{source} import of {path or 'generated data'}"
    with run_lock(run_dir, f"prepare {source}"):
        target = import_target(run_dir)
        result = get_importer(source)(Path(path) if path else None, target, cfg)
        df = result.manifest.copy()
        if df.empty:
            raise _nothing_kept(result, origin)
        if "split" not in df or df["split"].isna().all():
            df["split"] = assign_splits(df, fractions=tuple(cfg.data.split_fractions), seed=cfg.seed)
        df = add_task_labels(df, cfg.tasks.thresholds)
        df = mark_mirrored(df, cfg.data.mirror_left)
        df = knee_check_columns(df, run_dir, cfg.data.knee_check)
        df = validate_manifest(df, origin=origin)
        write_manifest(df, run_dir)
        write_data_report(data_report(df, result, cfg.tasks.names), run_dir)
        _write_table(result.quarantine, run_dir / QUARANTINE)
        _write_table(result.skipped, run_dir / SKIPPED)
        removed = _remove_unlisted(target, df)
        used = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=source,
                                                                 path=str(path) if path else None))
        write_text(dump_config(used), run_dir / "config.yaml")
        shutil.rmtree(run_dir / PREPARE_JOURNAL, ignore_errors=True)  # complete: nothing left to resume
    if removed:
        _logger.info("removed %d crop/mask file(s) of an earlier import that this manifest does not list", removed)
    if len(result.quarantine) or len(result.skipped):
        _logger.warning("%d item(s) quarantined, %d file(s) not used; reasons in %s", len(result.quarantine),
                        len(result.skipped), run_dir / DATA_REPORT)
    return df


def run(run_dir: Path, cfg: Config) -> None:
    """Stage entry: import cfg.data.source unless it is `manifest` (an existing manifest is used as it is)."""
    if cfg.data.source == "manifest":
        return
    prepare(run_dir, cfg)
