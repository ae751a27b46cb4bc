"""Folder-per-grade importer: `<root>/[<split>/]<KL grade>/<patient id><L|R>.png`, e.g. kneeKL224.

File names carry the patient id and side: `9001695L.png` is patient 9001695, left knee. The side is an upper-case
L or R right after the id, or any-case L/R/left/right after a `_` or `-` (`9001695_l.png`, `9001695-right.png`);
the id holds letters, digits, `_` and `-` and at least one digit. A name that does not parse is quarantined, never
guessed (`scan_original.png` is not patient `scan_origina`, left knee). Splits come from the folder names when
present (train / val / valid / validation / test; `auto_test` is read as test), else `prepare` makes them by
patient. Split and grade folders may be symbolic links. KL grades only: the OARSI-based tasks are absent, never
invented. Crops are used in place (absolute image paths), so nothing is copied, but every image is opened once
(`kneeoa.formats.pool`) so a truncated or empty file is quarantined here rather than stopping training later.
Every other file under the root (`.txt`, `.DS_Store`, DICOM, ...) is listed in `skipped` with the reason.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from kneeoa.errors import DataError
from kneeoa.formats.pool import check_image, process_map
from kneeoa.sources.importers import ImportResult, ImportTarget
from kneeoa.sources.manifest import SPLIT_ALIASES

_NAME = re.compile(r"^(?P<patient>[A-Za-z0-9_-]*?\d[A-Za-z0-9_-]*?)"
                   r"(?:(?P<side>[LR])|[_-](?P<word>(?i:l|r|left|right)))$")
_SIDE_WORDS = {"l": "L", "r": "R", "left": "L", "right": "R"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
_LAYOUT = "Expected <root>/[<split>/]<0-4>/<id><L|R>.png."


def parse_name(stem: str) -> tuple[str, str] | None:
    """(patient id, "L"/"R") from a file stem such as `9001695L`, or None when it does not parse unambiguously."""
    m = _NAME.match(stem)
    if m is None:
        return None
    return m["patient"], m["side"] or _SIDE_WORDS[m["word"].lower()]


def _walk(root: Path) -> list[Path]:
    """Every file under `root`, following symbolic links to folders (split folders are often links)."""
    out = []
    for folder, _, files in os.walk(root, followlinks=True):
        out += [Path(folder) / f for f in files]
    return sorted(out)


def _classify(path: Path, root: Path) -> tuple[dict | None, str | None]:
    """A manifest row for one file, or the reason it is not used."""
    rel = path.relative_to(root).parts
    grade_dir = rel[-2] if len(rel) >= 2 else ""
    split_dir = rel[-3].lower() if len(rel) >= 3 else None
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return None, f"not an image this importer reads (suffix '{path.suffix or path.name}'; reads " \
                     f"{', '.join(sorted(IMAGE_SUFFIXES))})"
    if not grade_dir.isdigit() or not 0 <= int(grade_dir) <= 4:
        return None, f"parent folder '{grade_dir}' is not a KL grade 0-4"
    parsed = parse_name(path.stem)
    if parsed is None:
        return None, ("file name does not end in L or R after a patient id with a digit (expected <patient id><L|R>, "
                      "e.g. 9001695L.png or 9001695_left.png)")
    if split_dir is not None and split_dir not in SPLIT_ALIASES:
        return None, f"folder '{rel[-3]}' is not a split name ({', '.join(SPLIT_ALIASES)})"
    patient, side = parsed
    return {"image_id": f"{patient}_{side}_V00", "patient_id": patient, "visit": 0, "side": side,
            "image_path": str(path.absolute()), "split": SPLIT_ALIASES.get(split_dir) if split_dir else None,
            "low_quality": False, "source": "folders", "klg": int(grade_dir)}, None


def import_folders(source: Path | None, target: ImportTarget, cfg) -> ImportResult:
    """Import a folder-per-grade tree (crops are used in place, so nothing is written to `target`).

    Images whose name, grade folder or split folder does not parse, or that cannot be opened, are quarantined with
    the reason; files that are not images are listed in `skipped`.

    Raises:
        DataError: the source is not a folder, holds no usable image, or mixes split and no-split layouts.
    """
    root = Path(source) if source else None
    if root is None or not root.is_dir():
        raise DataError(f"Folder-per-grade source {root} is not a folder. {_LAYOUT}")
    rows, bad, skipped = [], [], []
    for path in _walk(root):
        row, reason = _classify(path, root)
        if row is not None:
            rows.append(row)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            bad.append((str(path), reason))
        else:
            skipped.append((str(path), reason))
    unreadable = process_map(check_image, [r["image_path"] for r in rows], workers=cfg.data.workers,
                             desc="checking images", unit="image")
    bad += [(r["image_path"], why) for r, why in zip(rows, unreadable, strict=True) if why]
    rows = [r for r, why in zip(rows, unreadable, strict=True) if not why]
    quarantine = pd.DataFrame(bad, columns=["item", "reason"])
    skipped = pd.DataFrame(skipped, columns=["item", "reason"])
    if not rows:
        raise DataError(f"No usable knee images under {root} ({len(quarantine)} quarantined, {len(skipped)} other "
                        f"file(s)). {_LAYOUT}")
    df = pd.DataFrame(rows)
    if df["split"].isna().all():
        df = df.drop(columns="split")
    elif df["split"].isna().any():
        raise DataError(f"{root}: some images sit in split folders and some do not; use one layout.")
    dup = df["image_id"].duplicated(keep=False)
    if dup.any():
        extra = df[dup][["image_path"]].rename(columns={"image_path": "item"})
        conflict = df[dup].groupby("image_id")["klg"].transform("nunique") > 1
        extra["reason"] = ["the same patient and side appears more than once" +
                           (" with conflicting KL grades" if c else "") + " (in two grade or split folders)"
                           for c in conflict]
        quarantine = pd.concat([quarantine, extra], ignore_index=True)
        df = df[~dup]
    return ImportResult(manifest=df.reset_index(drop=True), quarantine=quarantine, skipped=skipped,
                        notes=["KL grades only: osteophytes, jsn and sclerosis are not available for this source."])
