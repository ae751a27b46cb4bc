"""A corpus of malformed inputs, one small source per case, and what each must end in, keyed by importer.

`CORPUS` maps each importer of the registry (`kneeoa.sources.importers.IMPORTERS`) to its cases, and `CLEAN` to a
small source it must import whole; `CONFIG_CASES` are study configs. A case says how to build its source and the
expected outcome: a named error (`error`, with the message it must contain), a quarantine entry (`quarantine`, item
and reason), or a file listed as not used (`skipped`). `tests/test_malformed_inputs.py` runs each through the real
`prepare` stage (or `load_config`), and fails for a registered importer that reads a source but has no cases here;
nothing may end in a traceback or disappear silently.

Run it as a script to write the corpus for a look by hand: `python tests/malformed_corpus.py OUT_DIR`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

KL_TREE_GOOD = [("train", 0, "9001L"), ("train", 2, "9001R"), ("train", 1, "9002L"), ("train", 3, "9002R"),
                ("val", 4, "9003L"), ("test", 1, "9004R")]


@dataclass(frozen=True)
class Case:
    """One malformed input.

    Attributes:
        name: test id.
        build: writes the source under a folder, returns the path to import (folder, table, release or YAML).
        outcome: "error", "quarantine" or "skipped".
        match: text the error message or the reason must contain.
        item: text the quarantined / skipped item must contain (file name, "line N").
    """

    name: str
    build: Callable[[Path], Path]
    outcome: str
    match: str
    item: str = ""


def _png(path: Path, value: int = 110, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(value).integers(0, 255, (size, size), dtype=np.uint8)).save(path)
    return path


def _kl_tree(root: Path, extra: Callable[[Path], None] | None = None) -> Path:
    for split, grade, stem in KL_TREE_GOOD:
        _png(root / "kl" / split / str(grade) / f"{stem}.png")
    if extra:
        extra(root / "kl")
    return root / "kl"


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _truncated_png(path: Path) -> None:
    _png(path, size=96)
    path.write_bytes(path.read_bytes()[:1500])


def _dicom(path: Path, *, spacing: float | None = 0.5, film: bool = False) -> Path:
    from kneeoa.formats.dicom import write_dicom
    from synthetic_films import single_film

    image = single_film(0.5) if film else np.random.default_rng(0).random((40, 40)).astype(np.float32)
    return write_dicom(image, path, spacing_mm=spacing)


def _retag(path: Path, **tags) -> Path:
    import pydicom

    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path)
    return path


def _spoil_spacing(path: Path, spacing: bytes, text: bytes) -> Path:
    """Overwrite the first ImagerPixelSpacing number in the file's bytes (pydicom refuses to write such a value)."""
    raw = path.read_bytes()
    assert spacing + b"\\" + spacing in raw
    path.write_bytes(raw.replace(spacing + b"\\" + spacing, text + b"\\" + spacing, 1))
    return path


def _multi_frame(path: Path) -> Path:
    import pydicom

    _dicom(path)
    ds = pydicom.dcmread(path)
    frames = np.stack([ds.pixel_array] * 2)
    ds.NumberOfFrames = 2
    ds.PixelData = frames.tobytes()
    ds.save_as(path)
    return path


def _table(root: Path, rows: list[dict], *, encoding: str = "utf-8", good: int = 3) -> Path:
    """A CSV with `good` usable crop rows first, then `rows` (file given as a builder or a name)."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(good):
        records.append({"image_path": str(_png(root / f"good{i}.png").name), "patient_id": f"G{i}", "side": "R",
                        "klg": str(i % 5)})
    for r in rows:
        r = dict(r)
        build = r.pop("build", None)
        if build is not None:
            build(root / r["image_path"])
        records.append({"side": "L", "klg": "", **r})
    path = root / "table.csv"
    pd.DataFrame(records).to_csv(path, index=False, encoding=encoding)
    return path


def _semicolons(path: Path) -> Path:
    """The same table saved with ';' between its fields (a spreadsheet's regional CSV)."""
    path.write_text(path.read_text().replace(",", ";"))
    return path


def _oai_with(root: Path, damage: Callable[[Path], None]) -> Path:
    from kneeoa.synthetic.phantom.films import write_phantom_release

    truth = write_phantom_release(root / "release", patients=2, visits=1, seed=0, spacings_mm=(0.6,), workers=1)
    damage(root / "release" / truth.loc[truth["has_film"], "film_path"].iloc[0])
    return root / "release"


def _yaml(text: bytes) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        _write(root / "study.yaml", text)
        return root / "study.yaml"

    return build


def _kl_case(name: str, extra: Callable[[Path], object], outcome: str, match: str, item: str = "") -> Case:
    """A folder-per-grade tree, good apart from what `extra` adds under its `kl/` folder."""
    return Case(name, lambda r: _kl_tree(r, extra), outcome, match, item)


def _row_case(name: str, row: dict, outcome: str, match: str, item: str = "", **table) -> Case:
    """A CSV table of three good crops, then `row` (line 5)."""
    return Case(name, lambda r: _table(r, [row], **table), outcome, match, item)


def _leaky_table(root: Path) -> Path:
    rows = [{"image_path": f"s{i}.png", "patient_id": p, "side": side, "split": s, "build": _png}
            for i, (p, s, side) in enumerate((("L", "train", "R"), ("L", "test", "L"), ("M", "val", "R")))]
    return _table(root, rows, good=0)


_FILM = {"image_path": "f.dcm", "patient_id": "X", "kind": "single"}
_CROP = {"patient_id": "X", "kind": "crop"}

#: Importer name -> its malformed sources.
CORPUS: dict[str, list[Case]] = {
    "folders": [
        _kl_case("folders-truncated-png", lambda k: _truncated_png(k / "train/2/9005L.png"), "quarantine",
                 "cannot be read as an image", "9005L.png"),
        _kl_case("folders-zero-byte-png", lambda k: _write(k / "train/2/9005L.png", b""), "quarantine",
                 "empty (0 bytes)", "9005L.png"),
        _kl_case("folders-unparseable-name", lambda k: _png(k / "train/2/scan_original.png"), "quarantine",
                 "does not end in L or R", "scan_original.png"),
        _kl_case("folders-bad-grade-folder", lambda k: _png(k / "train/7/9005L.png"), "quarantine",
                 "is not a KL grade 0-4", "9005L.png"),
        _kl_case("folders-bad-split-folder", lambda k: _png(k / "holdout/2/9005L.png"), "quarantine",
                 "folder 'holdout' is not a split name", "9005L.png"),
        _kl_case("folders-mixed-layout", lambda k: _png(k / "2/9005L.png"), "error",
                 "some images sit in split folders and some do not"),
        _kl_case("folders-text-file", lambda k: _write(k / "train/notes.txt", b"x"), "skipped", "suffix '.txt'",
                 "notes.txt"),
        _kl_case("folders-ds-store", lambda k: _write(k / "train/2/.DS_Store", b"\0"), "skipped",
                 "not an image this importer reads", ".DS_Store"),
        _kl_case("folders-dicom-file", lambda k: _dicom(k / "train/2/9005L.dcm"), "skipped", "suffix '.dcm'",
                 "9005L.dcm"),
        _kl_case("folders-conflicting-duplicate", lambda k: _png(k / "train/4/9001L.png"), "quarantine",
                 "conflicting KL grades", "9001L.png"),
        Case("folders-nothing-usable", lambda r: (_write(r / "kl/1/9001L.png", b""), r / "kl")[1], "error",
             "No usable knee images"),
    ],
    "csv": [
        _row_case("csv-fractional-kl", {"image_path": "good0.png", "patient_id": "X", "klg": "2.5"}, "error",
                  "line 5: column 'klg'"),
        _row_case("csv-kl-out-of-range", {"image_path": "good0.png", "patient_id": "X", "klg": "7"}, "error",
                  "column 'klg' (klg) is '7'"),
        _row_case("csv-non-numeric-kl", {"image_path": "good0.png", "patient_id": "X", "klg": "two"}, "error",
                  "line 5"),
        Case("csv-missing-columns", lambda r: (_write(r / "t.csv", b"file,patient\na.png,A\n"), r / "t.csv")[1],
             "error", "lacks image_path"),
        _row_case("csv-latin1", {"image_path": "x.png", "patient_id": "Jos\xe9"}, "error",
                  "is not UTF-8 text (byte 0xe9 on line 5; a Latin-1 or Windows-1252 export?). Save the table as "
                  "UTF-8", encoding="latin-1"),
        Case("csv-semicolons", lambda r: _semicolons(_table(r, [])), "error",
             "its fields are separated by ';', not commas"),
        _row_case("csv-dicom-zero-spacing",
                  {**_FILM, "build": lambda p: _spoil_spacing(_dicom(p, film=True), b"0.5", b"0.0")}, "quarantine",
                  "ImagerPixelSpacing is 0 x 0.5 mm; a pixel spacing must be positive", "line(s) 5"),
        _row_case("csv-missing-image", {"image_path": "nope.png", "patient_id": "X"}, "quarantine", "does not exist",
                  "line 5"),
        _row_case("csv-bad-side", {"image_path": "good0.png", "patient_id": "X", "side": "mid"}, "quarantine",
                  "side must be R/L", "line 5"),
        _row_case("csv-truncated-png", {"image_path": "cut.png", "patient_id": "X", "build": _truncated_png},
                  "quarantine", "cannot be read as an image", "line(s) 5"),
        _row_case("csv-zero-byte-png", {"image_path": "empty.png", "patient_id": "X",
                                        "build": lambda p: _write(p, b"")},
                  "quarantine", "cannot be read as an image", "line(s) 5"),
        _row_case("csv-conflicting-duplicate", {"image_path": "good1.png", "patient_id": "G0", "side": "R",
                                                "klg": "4"},
                  "quarantine", "repeats line 2 with conflicting labels (klg 0 vs 4)", "line 5"),
        _row_case("csv-bad-split", {"image_path": "x.png", "patient_id": "X", "split": "holdout", "build": _png},
                  "quarantine", "split 'holdout'", "line 5"),
        Case("csv-leakage", _leaky_table, "error", "patient 'L' appears in splits ['test', 'train']"),
        _row_case("csv-split-on-some-rows", {"image_path": "s.png", "patient_id": "S", "split": "train",
                                             "build": _png},
                  "error", "column 'split' is empty"),
        _row_case("csv-dicom-without-spacing", {**_FILM, "build": lambda p: _dicom(p, spacing=None, film=True)},
                  "quarantine", "no pixel spacing", "line(s) 5"),
        _row_case("csv-dicom-bad-spacing-tag",
                  {**_FILM, "build": lambda p: _spoil_spacing(_dicom(p, film=True), b"0.5", b"abc")}, "quarantine",
                  "ImagerPixelSpacing is", "line(s) 5"),
        _row_case("csv-rgb-dicom", {**_CROP, "image_path": "c.dcm",
                                    "build": lambda p: _retag(_dicom(p), PhotometricInterpretation="RGB")},
                  "quarantine", "grayscale", "line(s) 5"),
        _row_case("csv-multi-frame-dicom", {**_CROP, "image_path": "m.dcm", "build": _multi_frame}, "quarantine",
                  "expected one 2-D frame", "line(s) 5"),
        _row_case("csv-truncated-dicom", {**_CROP, "image_path": "t.dcm",
                                          "build": lambda p: _write(p, _dicom(p).read_bytes()[:-600])},
                  "quarantine", "t.dcm", "line(s) 5"),
        _row_case("csv-nothing-kept", {"image_path": "nope.png", "patient_id": "X"}, "error", "kept no image",
                  good=0),
    ],
    "oai": [
        Case("oai-bad-spacing-tag", lambda r: _oai_with(r, lambda film: _spoil_spacing(film, b"0.6", b"n/a")),
             "quarantine", "ImagerPixelSpacing is", ""),
    ],
}

#: Importer name -> a small source it must import whole (nothing quarantined, skipped or unmatched).
CLEAN: dict[str, Callable[[Path], Path]] = {
    "folders": _kl_tree,
    "csv": lambda r: _table(r, []),
    "oai": lambda r: _oai_with(r, lambda film: None),
}

#: Study configs `load_config` must refuse with a named error.
CONFIG_CASES = [
    Case("config-yaml-syntax", _yaml(b"cnn: [unclosed\n"), "error", "is not valid YAML"),
    Case("config-not-utf8", _yaml(b"name: caf\xe9\n"), "error", "is not UTF-8 text"),
    Case("config-task-typo", _yaml(b"tasks: {names: [osteofytes]}\n"), "error", "Did you mean"),
    Case("config-negative-epochs", _yaml(b"cnn: {epochs: -3}\n"), "error", "cnn.epochs: -3"),
    Case("config-unknown-key", _yaml(b"cnn: {epoch: 3}\n"), "error", "Unknown key 'epoch'"),
    Case("config-unknown-importer", _yaml(b"data: {source: dicomdir}\n"), "error", "data.source"),
]


def build_corpus(out: Path) -> dict[str, Path]:
    """Write every case's source under OUT/<case>/; returns case name -> the path to import (folder, table, release
    or YAML)."""
    cases = [*(c for importer in CORPUS.values() for c in importer), *CONFIG_CASES]
    return {c.name: c.build(Path(out) / c.name) for c in cases}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    for name, path in build_corpus(Path(sys.argv[1])).items():
        print(f"{name}: {path}")
