"""Importers: one per kind of source, each turning it into manifest rows plus what it could not use.

An importer is `fn(source: Path | None, target: ImportTarget, cfg: Config) -> ImportResult`. It writes its files
where `target` says (crops, masks, film overviews, its resume journal; the run folder decides where:
`kneeoa.runfolder.manifest.import_target`) and returns rows with at least the manifest's required columns except
`split` (which `prepare` assigns by patient when the source has none) and any label columns it has (raw OARSI grades,
`klg`); the paths in them are `target.manifest_path` of the files written. It never drops an item silently: unusable
items go to `quarantine` with a reason, files it does not use to `skipped`, unmatched readings/images to `unmatched`.

The registry maps a name to an `ImporterSpec`: where the function lives ("module:function", imported on first use),
what its `kneeoa prepare <name>` sub-command says, and the options it reads. `kneeoa prepare` builds one sub-command
per entry from this, with a `--<option>` flag per scalar option, so a new importer is one `IMPORTERS.add(...)` call
(or one entry point of group `kneeoa.importers` in another distribution, see `kneeoa.registry`).
Options that are `DataCfg` fields (the built-in importers') live under `data:` in the config; any other option of an
importer lives under `data.options.<importer>.<option>` and is read with `importer_option`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kneeoa.errors import ConfigError
from kneeoa.registry import Registry, resolve


@dataclass(frozen=True)
class ImportTarget:
    """Where an importer writes. Built by the run folder's owner (`kneeoa.runfolder.manifest.import_target`), so
    no importer joins a path under a run folder itself.

    Attributes:
        root: the folder the manifest's relative paths (`image_path`, `mask_path`) resolve against.
        crops_dir: knee crops, `<image_id>.png`.
        masks_dir: feature masks, `<image_id>.npz` (the phantom's).
        overview_dir: films drawn with the knees found in them (the film importers' localisation overviews).
        journal: where a film import records each finished film, so a rerun after a kill continues from it.
    """

    root: Path
    crops_dir: Path
    masks_dir: Path
    overview_dir: Path
    journal: Path

    def crop_file(self, image_id: str) -> Path:
        return self.crops_dir / f"{image_id}.png"

    def mask_file(self, image_id: str) -> Path:
        return self.masks_dir / f"{image_id}.npz"

    def manifest_path(self, path: Path) -> str:
        """A file written under `root` as the manifest records it: relative to `root`, with forward slashes
        (`crops/9001695_R_V00.png`), so the folder can move."""
        return Path(path).relative_to(self.root).as_posix()


@dataclass
class ImportResult:
    """What an importer produced.

    Attributes:
        manifest: one row per usable knee image (manifest columns; `split` optional).
        quarantine: items not imported, columns `item` (file or id), `reason`.
        unmatched: readings without images and images without readings, columns `kind`, `item`, `detail`.
        skipped: files found in the source but not used (not an image, another format), columns `item`, `reason`.
        notes: free-text facts for the data report (e.g. "READPRJ 15 preferred over 37 for 12 knees").
    """

    manifest: pd.DataFrame
    quarantine: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["item", "reason"]))
    unmatched: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["kind", "item", "detail"]))
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["item", "reason"]))
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ImporterOption:
    """One option an importer reads.

    Attributes:
        name: a `DataCfg` field (config `data.<name>`) or the importer's own key (`data.options.<importer>.<name>`).
        type: str, int, float or bool get a `--<name>` flag on `kneeoa prepare <importer>`; others are config-only.
        help: one line for the flag and the docs.
        default: for the importer's own keys (a `DataCfg` field has its own default).
    """

    name: str
    type: type = str
    help: str = ""
    default: Any = None

    @property
    def flag(self) -> bool:
        return self.type in (str, int, float, bool)


@dataclass(frozen=True)
class ImporterSpec:
    """A registered importer.

    Attributes:
        function: the importer, or its "module:function" (imported on first use).
        summary: the `kneeoa prepare <name>` sub-command's help.
        path_help: help of its PATH argument; None for an importer that reads no source (the phantom).
        options: the options it reads (see `ImporterOption`).
    """

    function: str | Callable[..., ImportResult]
    summary: str
    path_help: str | None = "The source folder or table."
    options: tuple[ImporterOption, ...] = ()


IMPORTERS: Registry[ImporterSpec] = Registry("importer", group="kneeoa.importers", entry_type=ImporterSpec)
_FILMS = (ImporterOption("crop_mm", float, "knee crop side in mm around the joint centre"),
          ImporterOption("localizer", str, "knee localiser for films (a LOCALIZERS name)"),
          ImporterOption("default_spacing_mm", float, "assume this pixel spacing (mm) for films without one"),
          ImporterOption("image_size", int, "crop size in pixels"),
          ImporterOption("workers", int, "processes decoding and localising films"))
IMPORTERS.add("phantom", ImporterSpec(
    "kneeoa.synthetic.phantom:import_phantom", "Generate synthetic knees with known features (no source needed).",
    path_help=None, options=(
        ImporterOption("patients", int, "number of patients"), ImporterOption("visits", int, "visits per patient"),
        ImporterOption("image_size", int, "crop size in pixels"),
        ImporterOption("low_quality_share", float, "share of deliberately low-quality images"))))
IMPORTERS.add("folders", ImporterSpec(
    "kneeoa.sources.folders:import_folders", "Import a folder-per-grade set such as kneeKL224 (KL only).",
    "<root>/[<split>/]<KL>/<id><L|R>.png tree.", (ImporterOption("workers", int, "processes checking images"),)))
IMPORTERS.add("oai", ImporterSpec(
    "kneeoa.sources.oai:import_oai",
    "Import an OAI-shaped release: bilateral PA DICOM films -> per-knee crops with OARSI and KL readings.",
    "OAI release folder (contents.csv + kXR_SQ_BU tables).", _FILMS))
IMPORTERS.add("csv", ImporterSpec(
    "kneeoa.sources.csv_table:import_csv",
    "Import hospital data described by a CSV table (columns mapped by data.csv_columns).",
    "Table with image path, patient id, side, visit, labels.",
    (ImporterOption("csv_kind", str, "images without a `kind` column: auto | crop | single | bilateral"),
     ImporterOption("csv_columns", dict, "manifest column -> table column"), *_FILMS)))


def get_importer(name: str) -> Callable[[Path | None, ImportTarget, object], ImportResult]:
    return resolve(IMPORTERS.get(name).function)


def _is_data_field(name: str) -> bool:
    from kneeoa.config import DataCfg

    return name in {f.name for f in dataclasses.fields(DataCfg)}


def importer_option(cfg: Any, importer: str, name: str) -> Any:
    """The value of an importer's option: `data.<name>` for DataCfg fields, else `data.options.<importer>.<name>`."""
    spec = IMPORTERS.get(importer)
    option = next((o for o in spec.options if o.name == name), None)
    if option is None:
        raise ConfigError(f"Importer '{importer}' declares no option '{name}'; it declares "
                          f"{', '.join(o.name for o in spec.options) or 'none'}.")
    if _is_data_field(name):
        return getattr(cfg.data, name)
    return cfg.data.options.get(importer, {}).get(name, option.default)


def set_importer_option(cfg: Any, importer: str, name: str, value: Any) -> None:
    """Set an importer's option where `importer_option` reads it (used by `kneeoa prepare <importer> --<name>`)."""
    if _is_data_field(name):
        setattr(cfg.data, name, value)
    else:
        cfg.data.options.setdefault(importer, {})[name] = value


def option_problems(options: dict[str, dict[str, Any]]) -> list[str]:
    """`data.options` checked against the registry: known importers, declared keys, declared types (converted)."""
    from kneeoa.config import check_type

    out = []
    for importer, values in options.items():
        if importer not in IMPORTERS:
            out.append(f"data.options.{importer}: no importer of that name; registered: {', '.join(IMPORTERS)}.")
            continue
        declared = {o.name: o for o in IMPORTERS.get(importer).options if not _is_data_field(o.name)}
        if not isinstance(values, dict):
            out.append(f"data.options.{importer}: {values!r} must be a mapping of option -> value.")
            continue
        for key, value in values.items():
            if key not in declared:
                out.append(f"data.options.{importer}.{key}: not an option of '{importer}'; its own options: "
                           f"{', '.join(declared) or 'none'}.")
                continue
            try:
                values[key] = check_type(value, declared[key].type, f"data.options.{importer}.{key}")
            except ConfigError as e:
                out.append(str(e))
    return out
