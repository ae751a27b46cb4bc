"""RUN_DIR/manifest.parquet (owner: `prepare`) and RUN_DIR/data_report.json, as every later stage reads them.

The manifest's schema and validator belong to the importers' contract (`kneeoa.sources.manifest`: one row per knee
image, validated on every read and write); this module is where stages and the report get them from, so none of
them reaches into the data package or the prepare stage for a file name. It also says where an importer writes
(`import_target`: RUN_DIR/crops/, masks/, figures/localize/ and the resume journal .prepare/films/).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kneeoa.io import write_json
from kneeoa.sources.importers import ImportTarget
from kneeoa.sources.manifest import (
    MANIFEST_NAME,
    load_knee,
    read_manifest,
    resolve_image_path,
    validate_manifest,
    write_manifest,
)

DATA_REPORT = "data_report.json"
QUARANTINE = "quarantine.parquet"
SKIPPED = "skipped.parquet"  # files found in the source and not used, with reasons
PREPARE_JOURNAL = Path(".prepare")  # per-film outcomes of an unfinished prepare (films/), removed when it completes
CROPS_DIR = "crops"
MASKS_DIR = "masks"
#: Where `kneeoa prepare` draws its film overviews (the data report shows them).
OVERVIEW_DIR = Path("figures") / "localize"

__all__ = ["CROPS_DIR", "DATA_REPORT", "MANIFEST_NAME", "MASKS_DIR", "OVERVIEW_DIR", "PREPARE_JOURNAL", "QUARANTINE",
           "SKIPPED", "import_target", "load_knee", "read_data_report", "read_manifest", "resolve_image_path",
           "validate_manifest", "write_data_report", "write_manifest"]


def import_target(run_dir: Path) -> ImportTarget:
    """Where an importer writes into `run_dir`: crops/, masks/, figures/localize/ and .prepare/films/."""
    run_dir = Path(run_dir)
    return ImportTarget(root=run_dir, crops_dir=run_dir / CROPS_DIR, masks_dir=run_dir / MASKS_DIR,
                        overview_dir=run_dir / OVERVIEW_DIR, journal=run_dir / PREPARE_JOURNAL / "films")


def write_data_report(report: dict[str, Any], run_dir: Path) -> Path:
    return write_json(report, Path(run_dir) / DATA_REPORT)


def read_data_report(run_dir: Path) -> dict[str, Any] | None:
    """The import's data report, or None for a run whose manifest was made without `prepare`."""
    path = Path(run_dir) / DATA_REPORT
    return json.loads(path.read_text()) if path.exists() else None
