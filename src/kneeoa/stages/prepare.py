"""Stage `prepare`: run the configured importer, assign splits by patient, derive task labels, write the manifest
and the data report (counts per split / grade / visit, quarantined items with reasons, unmatched readings and
images, label missingness per task)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from kneeoa.config import Config
from kneeoa.data.importers import ImportResult, get_importer
from kneeoa.data.manifest import mark_mirrored, validate_manifest, write_manifest
from kneeoa.data.splits import assign_splits
from kneeoa.io import write_json, write_parquet
from kneeoa.tasks import TASKS, add_task_labels

_logger = logging.getLogger(__name__)

DATA_REPORT = "data_report.json"


def data_report(manifest: pd.DataFrame, result: ImportResult, task_names: list[str]) -> dict[str, Any]:
    """Counts and losses of one import, as written to RUN_DIR/data_report.json."""
    counts = {"images": len(manifest), "patients": int(manifest["patient_id"].nunique()),
              "per_split": manifest["split"].value_counts().sort_index().to_dict(),
              "per_visit": manifest["visit"].value_counts().sort_index().to_dict(),
              "low_quality": int(manifest["low_quality"].sum())}
    per_grade = {}
    for name in ["klg", *task_names]:
        if name in manifest and name in TASKS and manifest[name].notna().any():
            table = pd.crosstab(manifest[name], manifest["split"])
            per_grade[name] = {str(int(k)): v for k, v in table.to_dict(orient="index").items()}
    missing = {name: (float(manifest[name].isna().mean()) if name in manifest else 1.0) for name in task_names}
    return {"counts": counts, "per_grade": per_grade, "label_missing_share": missing,
            "quarantine": result.quarantine.to_dict(orient="records"),
            "unmatched": result.unmatched.to_dict(orient="records"), "notes": result.notes}


def prepare(run_dir: Path, cfg: Config, source: str | None = None, path: str | Path | None = None) -> pd.DataFrame:
    """Import `source` (default cfg.data.source) from `path` into RUN_DIR/manifest.parquet; returns the manifest."""
    run_dir = Path(run_dir)
    source = source or cfg.data.source
    path = path if path is not None else cfg.data.path
    result = get_importer(source)(Path(path) if path else None, run_dir, cfg)
    df = result.manifest.copy()
    if "split" not in df or df["split"].isna().all():
        df["split"] = assign_splits(df, fractions=tuple(cfg.data.split_fractions), seed=cfg.seed)
    df = add_task_labels(df, cfg.tasks.thresholds)
    df = mark_mirrored(df, cfg.data.mirror_left)
    df = validate_manifest(df, origin=f"{source} import of {path or 'generated data'}")
    write_manifest(df, run_dir)
    report = data_report(df, result, cfg.tasks.names)
    write_json(report, run_dir / DATA_REPORT)
    if len(result.quarantine):
        write_parquet(result.quarantine.astype(str), run_dir / "quarantine.parquet")
        _logger.warning("%d item(s) quarantined; reasons in %s", len(result.quarantine), run_dir / DATA_REPORT)
    return df


def run(run_dir: Path, cfg: Config) -> None:
    """Stage entry: import cfg.data.source unless it is `manifest` (an existing manifest is used as it is)."""
    if cfg.data.source == "manifest":
        return
    prepare(run_dir, cfg)
