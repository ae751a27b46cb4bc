"""Importers: one per kind of source, each turning it into manifest rows plus what it could not use.

An importer is `fn(source: Path | None, run_dir: Path, cfg: Config) -> ImportResult`. It writes crops under
RUN_DIR/crops/ and returns rows with at least the manifest's required columns except `split` (which `prepare`
assigns by patient when the source has none) and any label columns it has (raw OARSI grades, `klg`). It never drops
an item silently: unusable items go to `quarantine` with a reason, unmatched readings/images to `unmatched`.
The registry maps a name to "module:function" and imports lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kneeoa.registry import Registry


@dataclass
class ImportResult:
    """What an importer produced.

    Attributes:
        manifest: one row per usable knee image (manifest columns; `split` optional).
        quarantine: items not imported, columns `item` (file or id), `reason`.
        unmatched: readings without images and images without readings, columns `kind`, `item`, `detail`.
        notes: free-text facts for the data report (e.g. "READPRJ 15 preferred over 37 for 12 knees").
    """

    manifest: pd.DataFrame
    quarantine: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["item", "reason"]))
    unmatched: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["kind", "item", "detail"]))
    notes: list[str] = field(default_factory=list)


IMPORTERS: Registry[str] = Registry("importer")
IMPORTERS.update({
    "phantom": "kneeoa.data.phantom:import_phantom",
    "folders": "kneeoa.data.folders:import_folders",
    "oai": "kneeoa.data.oai:import_oai",
    "csv": "kneeoa.data.csv_table:import_csv",
})


def get_importer(name: str) -> Callable[[Path | None, Path, object], ImportResult]:
    return IMPORTERS.load(name)
