"""Folder-per-grade importer: `<root>/[<split>/]<KL grade>/<patient id><L|R>.png`, e.g. kneeKL224.

File names carry the patient id and side (`9001695L.png`: patient 9001695, left knee); a `labels.csv` beside the
folders is not needed. Splits come from the folder names when present (train / val / test; `auto_test` is read as
test), else `prepare` makes them by patient. KL grades only: the OARSI-based tasks are absent, never invented.
Crops are used in place (absolute image paths), so nothing is copied.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from kneeoa.data.importers import ImportResult
from kneeoa.errors import DataError

_NAME = re.compile(r"^(?P<patient>.+?)[_-]?(?P<side>[LR])$", re.IGNORECASE)
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test",
                  "auto_test": "test"}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def import_folders(source: Path | None, run_dir: Path, cfg) -> ImportResult:
    """Import a folder-per-grade tree. Files whose name or folder does not parse are quarantined with the reason."""
    root = Path(source) if source else None
    if root is None or not root.is_dir():
        raise DataError(f"Folder-per-grade source {root} is not a folder. "
                        "Expected <root>/[<split>/]<0-4>/<id><L|R>.png.")
    rows, bad = [], []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES):
        rel = path.relative_to(root).parts
        grade_dir = rel[-2] if len(rel) >= 2 else ""
        split_dir = rel[-3].lower() if len(rel) >= 3 else None
        m = _NAME.match(path.stem)
        if not grade_dir.isdigit() or not 0 <= int(grade_dir) <= 4:
            bad.append((str(path), f"parent folder '{grade_dir}' is not a KL grade 0-4"))
            continue
        if m is None:
            bad.append((str(path), "file name does not end in L or R (expected <patient id><L|R>)"))
            continue
        if split_dir is not None and split_dir not in _SPLIT_ALIASES:
            bad.append((str(path), f"folder '{rel[-3]}' is not a split name ({', '.join(_SPLIT_ALIASES)})"))
            continue
        side = m["side"].upper()
        rows.append({"image_id": f"{m['patient']}_{side}_V00", "patient_id": m["patient"], "visit": 0, "side": side,
                     "image_path": str(path.resolve()), "split": _SPLIT_ALIASES.get(split_dir) if split_dir else None,
                     "low_quality": False, "source": "folders", "klg": int(grade_dir)})
    if not rows:
        raise DataError(f"No knee images found under {root}. Expected <root>/[<split>/]<0-4>/<id><L|R>.png.")
    df = pd.DataFrame(rows)
    if df["split"].isna().all():
        df = df.drop(columns="split")
    elif df["split"].isna().any():
        raise DataError(f"{root}: some images sit in split folders and some do not; use one layout.")
    dup = df["image_id"].duplicated(keep=False)
    quarantine = pd.DataFrame(bad, columns=["item", "reason"])
    if dup.any():
        extra = df[dup][["image_path"]].rename(columns={"image_path": "item"})
        extra["reason"] = "the same patient and side appears more than once (in two grade or split folders)"
        quarantine = pd.concat([quarantine, extra], ignore_index=True)
        df = df[~dup]
    return ImportResult(manifest=df.reset_index(drop=True), quarantine=quarantine,
                        notes=["KL grades only: osteophytes, jsn and sclerosis are not available for this source."])
