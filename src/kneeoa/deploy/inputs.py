"""What `kneeoa predict` is given: image files, folders of them and CSV lists, as one list of `InputFile`.

A CSV list has a `file` column (paths relative to the CSV's folder, or absolute) and optionally `kind` (bilateral,
single or crop) and `side` (R or L, for single-knee films and crops). Anything not given is decided per file by
`detect_kind`: PNG and JPEG are crops; a DICOM is a bilateral film when its laterality says both or it is at least
`BILATERAL_MM` wide, a crop when it is at most `CROP_MM` wide or has no pixel spacing, else a single-knee film.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kneeoa.errors import ConfigError, DataError
from kneeoa.localize.films import FILM_KINDS

#: A DICOM at least this wide (mm) shows both knees; at most CROP_MM wide it is a knee crop.
BILATERAL_MM = 250.0
CROP_MM = 180.0
SIDES = ("R", "L")


@dataclass(frozen=True)
class InputFile:
    """One file to grade. kind: one of FILM_KINDS or None (detect); side: "R", "L" or None (unknown)."""

    path: Path
    kind: str | None = None
    side: str | None = None


def _check(value: str | None, allowed: tuple[str, ...], what: str, where: str) -> str | None:
    if value is None or (isinstance(value, float) and pd.isna(value)) or str(value).strip() == "":
        return None
    value = str(value).strip()
    if value not in allowed:
        raise ConfigError(f"{where}: {what} is {value!r}; expected one of {', '.join(allowed)} (or empty).")
    return value


def _from_csv(path: Path) -> list[InputFile]:
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read as a CSV list ({e}).") from e
    if "file" not in table:
        raise ConfigError(f"{path} has columns {list(table.columns)}; a CSV list needs a 'file' column (and "
                          "optionally 'kind' and 'side').")
    out = []
    for i, row in table.iterrows():
        where = f"{path} row {i + 2}"
        file = Path(str(row["file"]))
        out.append(InputFile(file if file.is_absolute() else path.parent / file,
                             _check(row.get("kind"), FILM_KINDS, "kind", where),
                             _check(row.get("side"), SIDES, "side", where)))
    return out


def _from_folder(folder: Path) -> list[InputFile]:
    """Every file under `folder` but hidden ones: images are graded, any other file is reported with its reason
    (a folder given to grade should hold only images; nothing in it is passed over in silence)."""
    return [InputFile(p) for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")]


def collect_inputs(paths: list[Path], *, kind: str | None = None, side: str | None = None) -> list[InputFile]:
    """Expand command-line inputs into files, in the order given (folders sorted, CSV lists in row order).

    Args:
        paths: files, folders and `.csv` lists. A path that does not exist is kept: it is reported as a bad file.
        kind, side: defaults for files whose CSV row does not say (command-line `--kind`, `--side`).

    Raises:
        ConfigError: a CSV list without a `file` column or with an invalid kind or side.
    """
    kind = _check(kind, FILM_KINDS, "--kind", "command line")
    side = _check(side, SIDES, "--side", "command line")
    out: list[InputFile] = []
    for p in map(Path, paths):
        items = (_from_csv(p) if p.is_file() and p.suffix.lower() == ".csv" else
                 _from_folder(p) if p.is_dir() else [InputFile(p)])
        out.extend(InputFile(i.path, i.kind or kind, i.side or side) for i in items)
    return out


@dataclass(frozen=True)
class FileFacts:
    """What a file's header says: whether it is DICOM, its width in mm (None: no spacing) and its laterality."""

    dicom: bool
    width_mm: float | None
    laterality: str | None


def read_facts(path: Path) -> FileFacts:
    """Header facts of an image file, without decoding pixels.

    Raises:
        DataError: the file is missing, or neither DICOM, PNG nor JPEG.
    """
    from kneeoa.formats.dicom import _laterality, _spacing, is_dicom, read_header

    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file.")
    if is_dicom(path):
        ds = read_header(path)
        spacing = _spacing(ds)
        cols = ds.get("Columns")
        width = float(cols) * spacing[1] if spacing and cols else None
        return FileFacts(True, width, _laterality(ds))
    with path.open("rb") as f:
        head = f.read(8)
    if not (head.startswith(b"\x89PNG\r\n\x1a\n") or head.startswith(b"\xff\xd8\xff")):
        raise DataError(f"{path} is not an image kneeoa reads: expected DICOM, PNG or JPEG.")
    return FileFacts(False, None, None)


def detect_kind(facts: FileFacts) -> str:
    """bilateral, single or crop, from a file's header facts (see the module docstring)."""
    if not facts.dicom:
        return "crop"
    if facts.laterality == "B" or (facts.width_mm is not None and facts.width_mm >= BILATERAL_MM):
        return "bilateral"
    if facts.width_mm is None or facts.width_mm <= CROP_MM:
        return "crop"
    return "single"
