"""The Osteoarthritis Initiative (OAI) importer: central X-ray readings joined to bilateral PA knee films.

Source layout (as distributed by the OAI / NDA):

- reading tables `kXR_SQ_BU{vv}.txt` (pipe-delimited ASCII, one per visit vv in 00, 01, 03, 05, 06, 08, 10) or the
  same tables as SAS `kxr_sq_bu{vv}.sas7bdat`; columns ID, SIDE (1 = right, 2 = left), READPRJ and the variables
  V{vv}XRKL (Kellgren-Lawrence grade) and V{vv}XROSFM ... V{vv}XRSCTL (OARSI atlas grades).
- image folders, one per visit (e.g. `00m/`, `12m/`), each with a `contents.csv` (Folder, ParticipantID,
  StudyDate, Barcode, StudyDescription, SeriesDescription) and the DICOM of each series at `<Folder>/001`.

Choices, each reported in the ImportResult notes:

- Several reading projects read some knees twice. READPRJ 15 is the OAI's central reading (Boston University),
  which covers the cohort with one protocol; projects 37 and 42 re-read subsets for sub-studies. We keep one
  reading per knee and visit, preferring 15, then 37, then 42, then the lowest other project number, so labels
  come from one protocol wherever it exists.
- OAI missing-value codes (".", ".A", ".M", ".T", ".J", ".: Missing Form/Incomplete Workbook" ...) become missing
  labels, never 0. Values may be numbers or "code: label" text ("2: 2", "1: Definite"); the code is the value.
- Only "Bilateral PA Fixed Flexion Knee" series are used; other series (hand, chest, lateral knee ...) are counted
  and ignored. Each film gives the right knee (image left) and the left knee (image right).
- A knee reading with no film is `unmatched` ("reading_without_image"), a film side with no reading too
  ("image_without_reading", not cropped); a film that cannot be read or localised goes to `quarantine`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kneeoa.errors import DataError
from kneeoa.localize.films import FilmJob, run_film_jobs, with_overviews
from kneeoa.sources.importers import ImportResult, ImportTarget
from kneeoa.tasks import RAW_GRADE_COLUMNS

#: OAI visit code -> visit number. The X-ray readings exist for these visits (months 0, 12, 24, 36, 48, 72, 96).
READ_VISITS: dict[str, int] = {"00": 0, "01": 1, "03": 3, "05": 5, "06": 6, "08": 8, "10": 10}
#: Image-release folder names (months since baseline) -> visit number.
VISIT_FOLDERS: dict[str, int] = {"00m": 0, "12m": 1, "18m": 2, "24m": 3, "30m": 4, "36m": 5, "48m": 6, "72m": 8,
                                 "96m": 10}
#: Manifest column -> OAI variable suffix (after V{vv}).
VARIABLES: dict[str, str] = {
    "klg": "XRKL", "os_fm": "XROSFM", "os_fl": "XROSFL", "os_tm": "XROSTM", "os_tl": "XROSTL",
    "jsn_m": "XRJSM", "jsn_l": "XRJSL", "sc_fm": "XRSCFM", "sc_fl": "XRSCFL", "sc_tm": "XRSCTM", "sc_tl": "XRSCTL"}
#: Preferred reading projects, best first (see the module docstring); others rank after, lowest number first.
READPRJ_PREFERENCE = (15, 37, 42)
KNEE_SERIES = "bilateral pa fixed flexion knee"
SIDES = {1: "R", 2: "L"}
GRADE_MAX = {"klg": 4, **{c: 3 for c in RAW_GRADE_COLUMNS}}
TABLE_RE = re.compile(r"^kxr_sq_bu(\d\d)\.(txt|sas7bdat)$", re.IGNORECASE)


def parse_code(value: object) -> float:
    """An OAI cell as a number: "2", "2: 2", "1: Definite" -> the code; missing codes (".", ".M: ...") -> NaN.

    Example:
        >>> parse_code("1: Definite"), parse_code(".M: Missing"), parse_code(3.0)
        (1.0, nan, 3.0)
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return np.nan
    if isinstance(value, int | float | np.number):
        return float(value)
    text = str(value).strip()
    if not text or text.startswith("."):
        return np.nan
    code = text.split(":", 1)[0].strip()
    try:
        return float(code)
    except ValueError:
        return np.nan


def _read_table(path: Path) -> pd.DataFrame:
    try:
        if path.suffix.lower() == ".txt":
            df = pd.read_csv(path, sep="|", dtype=str, keep_default_na=False, skipinitialspace=True)
        else:
            df = pd.read_sas(path, format="sas7bdat", encoding="latin-1")
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise DataError(f"Reading table {path} cannot be parsed ({e}). Expected OAI pipe-delimited ASCII or "
                        "SAS.") from e
    df.columns = [str(c).strip().upper() for c in df.columns]
    return df


@dataclass
class _Readings:
    table: pd.DataFrame  # one row per patient_id, visit, side: readprj + label columns
    quarantine: list[dict]
    notes: list[str]


def _visit_readings(path: Path, code: str) -> _Readings:
    """One visit's table: parsed codes, missing codes as NaN, one reading per knee by READPRJ preference."""
    df = _read_table(path)
    needed = ["ID", "SIDE", "READPRJ"]
    missing = [c for c in needed if c not in df]
    if missing:
        raise DataError(f"Reading table {path} lacks column(s) {missing}; OAI kXR_SQ_BU tables have ID, SIDE, "
                        f"READPRJ and V{code}XR... variables. Check the file is the one named.")
    quarantine, notes = [], []
    out = pd.DataFrame({"patient_id": df["ID"].astype(str).str.strip().str.split(".").str[0],
                        "side": df["SIDE"].map(parse_code).map(SIDES),
                        "readprj": df["READPRJ"].map(parse_code),
                        "visit": READ_VISITS[code], "table_row": np.arange(len(df)) + 2})
    for col, var in VARIABLES.items():
        name = f"V{code}{var}"
        if name not in df:
            notes.append(f"{path.name}: no column {name}; '{col}' is missing for visit {code}.")
            out[col] = np.nan
            continue
        values = df[name].map(parse_code)
        bad = values.notna() & ((values < 0) | (values > GRADE_MAX[col]) | (values % 1 != 0))
        if bad.any():
            notes.append(f"{path.name}: {int(bad.sum())} value(s) of {name} outside 0-{GRADE_MAX[col]} "
                         f"(e.g. {df.loc[bad, name].iloc[0]!r}) treated as missing.")
        out[col] = values.mask(bad)
    bad_side = out["side"].isna() | (out["patient_id"] == "")
    for i in out.index[bad_side]:
        quarantine.append({"item": f"{path.name} line {out.at[i, 'table_row']}",
                           "reason": f"SIDE {df.at[i, 'SIDE']!r} / ID {df.at[i, 'ID']!r}: SIDE must be 1 (right) or "
                                     "2 (left) and ID a participant id"})
    out = out[~bad_side]
    rank = out["readprj"].map(lambda p: READPRJ_PREFERENCE.index(p) if p in READPRJ_PREFERENCE else
                              len(READPRJ_PREFERENCE) + (p if p == p else 1e9))
    out = out.assign(_rank=rank).sort_values(["patient_id", "side", "_rank", "table_row"])
    dup = out.duplicated(["patient_id", "side"], keep="first")
    if dup.any():
        kept = out[~dup].set_index(["patient_id", "side"])["readprj"]
        dropped = out[dup]
        pairs = pd.Series([f"{kept[(p, s)]:g} over {r:g}" for p, s, r in
                           zip(dropped["patient_id"], dropped["side"], dropped["readprj"], strict=True)])
        for pair, n in pairs.value_counts().sort_index().items():
            notes.append(f"visit {code}: READPRJ {pair} for {n} knee reading(s).")
    return _Readings(out[~dup].drop(columns="_rank"), quarantine, notes)


def read_readings(source: Path) -> _Readings:
    """All kXR_SQ_BU tables under `source` (ASCII preferred over SAS for the same visit), one row per knee/visit."""
    tables: dict[str, Path] = {}
    for path in sorted(Path(source).rglob("*")):
        m = TABLE_RE.match(path.name)
        if m and m.group(1) in READ_VISITS and (m.group(1) not in tables or path.suffix.lower() == ".txt"):
            tables[m.group(1)] = path
    if not tables:
        raise DataError(f"No OAI reading tables (kXR_SQ_BU00.txt ... kXR_SQ_BU10.txt or .sas7bdat) under {source}. "
                        "Point `kneeoa prepare oai` at the folder holding the OAI release.")
    parts = [_visit_readings(path, code) for code, path in sorted(tables.items())]
    table = pd.concat([p.table for p in parts], ignore_index=True)
    notes = [f"reading tables: {', '.join(p.name for _, p in sorted(tables.items()))}"]
    return _Readings(table, [q for p in parts for q in p.quarantine], notes + [n for p in parts for n in p.notes])


def _visit_of(contents: Path, folder: str) -> int | None:
    """Visit of an image row: the release folder's name (00m, 12m ...), else the Folder's first part (1.C.2 -> 1)."""
    for name in reversed(contents.parent.parts):
        if name.lower() in VISIT_FOLDERS:
            return VISIT_FOLDERS[name.lower()]
    m = re.match(r"^(\d+)\.", folder.strip())
    return int(m.group(1)) if m else None


def read_films(source: Path) -> tuple[pd.DataFrame, list[dict], list[str]]:
    """Knee films listed in every contents.csv under `source`: patient_id, visit, barcode, film_path."""
    rows, quarantine = [], []
    ignored: dict[str, int] = {}
    listings = sorted(Path(source).rglob("contents.csv"))
    for contents in listings:
        try:
            df = pd.read_csv(contents, dtype=str, keep_default_na=False)
        except (OSError, ValueError, pd.errors.ParserError) as e:
            raise DataError(f"{contents} cannot be parsed as CSV ({e}).") from e
        missing = [c for c in ("Folder", "ParticipantID", "SeriesDescription") if c not in df]
        if missing:
            raise DataError(f"{contents} lacks column(s) {missing}; OAI contents.csv has Folder, ParticipantID, "
                            "StudyDate, Barcode, StudyDescription, SeriesDescription.")
        for i, r in df.iterrows():
            series = r["SeriesDescription"].strip()
            if series.lower() != KNEE_SERIES:
                ignored[series] = ignored.get(series, 0) + 1
                continue
            visit = _visit_of(contents, r["Folder"])
            item = f"{contents} line {i + 2}"
            if visit is None:
                quarantine.append({"item": item, "reason": f"visit unknown: folder {contents.parent.name!r} is not one "
                                   f"of {list(VISIT_FOLDERS)} and Folder {r['Folder']!r} does not start with it"})
                continue
            film = contents.parent / r["Folder"].strip() / "001"
            if not film.is_file():
                quarantine.append({"item": item, "reason": f"film {film} listed in contents.csv does not exist"})
                continue
            rows.append({"patient_id": r["ParticipantID"].strip(), "visit": visit, "barcode": r.get("Barcode", ""),
                         "film_path": str(film)})
    notes = [f"image listings: {len(listings)} contents.csv, {len(rows)} knee film(s)"]
    notes += [f"ignored {n} series '{s}' (not {KNEE_SERIES!r})" for s, n in sorted(ignored.items())]
    films = pd.DataFrame(rows, columns=["patient_id", "visit", "barcode", "film_path"])
    dup = films.duplicated(["patient_id", "visit"], keep="first")
    for _, r in films[dup].iterrows():
        quarantine.append({"item": r["film_path"], "reason": f"second knee film for participant {r['patient_id']} "
                           f"visit {r['visit']}; the first listed was used"})
    return films[~dup].reset_index(drop=True), quarantine, notes


def _image_id(patient_id: str, side: str, visit: int) -> str:
    return f"{patient_id}_{side}_V{visit:02d}"


def import_oai(source: Path, target: ImportTarget, cfg) -> ImportResult:
    """Import an OAI release: readings x bilateral PA films -> localised 16-bit knee crops and manifest rows.

    Args:
        source: folder holding the kXR_SQ_BU tables and the per-visit image folders (searched recursively).
        target: where crops (`target.crop_file`), film overviews and the resume journal go.
        cfg: study config (uses cfg.data: crop_mm, image_size, workers, localizer,
            default_spacing_mm).

    Returns:
        ImportResult with rows image_id ("9001695_R_V00"), patient_id, visit, side, image_path, source "oai",
        low_quality False, klg, os_fm ... sc_tl, pixel_spacing_mm, film_path, readprj, barcode.

    Raises:
        DataError: `source` has no reading tables, or a table/listing lacks its required columns.
    """
    source, d = Path(source), cfg.data
    if not source.is_dir():
        raise DataError(f"OAI source {source} is not a folder. Pass the folder holding the OAI release.")
    readings = read_readings(source)
    films, quarantine, notes = read_films(source)
    quarantine = readings.quarantine + quarantine
    notes = readings.notes + notes
    read_keys = readings.table.set_index(["patient_id", "visit", "side"])
    unmatched, jobs = [], []
    for film in films.itertuples(index=False):
        ids = {}
        for side in ("R", "L"):
            image_id = _image_id(film.patient_id, side, film.visit)
            if (film.patient_id, film.visit, side) in read_keys.index:
                ids[side] = image_id
            else:
                unmatched.append({"kind": "image_without_reading", "item": image_id,
                                  "detail": f"{film.film_path}: no kXR_SQ_BU reading for this knee"})
        if ids:
            jobs.append(FilmJob(Path(film.film_path), ids, "bilateral", target.crops_dir, crop_mm=d.crop_mm,
                                image_size=d.image_size, localizer=d.localizer,
                                default_spacing_mm=d.default_spacing_mm, dicom=True))
    filmed = set(zip(films["patient_id"], films["visit"], strict=True))
    for r in readings.table.itertuples(index=False):
        if (r.patient_id, r.visit) not in filmed:
            unmatched.append({"kind": "reading_without_image", "item": _image_id(r.patient_id, r.side, r.visit),
                              "detail": f"READPRJ {r.readprj:g}: no Bilateral PA Fixed Flexion Knee film listed"})
    crops = []
    for outcome in run_film_jobs(with_overviews(jobs, target.overview_dir), workers=d.workers, desc="OAI films",
                                 journal=target.journal):
        if outcome.reason:
            quarantine.append({"item": str(outcome.job.path), "reason": f"{outcome.reason} (knees "
                               f"{', '.join(outcome.job.image_ids.values())})"})
        crops += [{**c, "film_path": str(outcome.job.path)} for c in outcome.crops]
    manifest = _manifest_rows(crops, readings.table, films, target)
    notes.append(f"{len(manifest)} knee crop(s) from {len(jobs)} film(s); {len(quarantine)} quarantined item(s), "
                 f"{len(unmatched)} unmatched")
    return ImportResult(manifest=manifest, quarantine=pd.DataFrame(quarantine, columns=["item", "reason"]),
                        unmatched=pd.DataFrame(unmatched, columns=["kind", "item", "detail"]), notes=notes)


def _manifest_rows(crops: list[dict], readings: pd.DataFrame, films: pd.DataFrame,
                   target: ImportTarget) -> pd.DataFrame:
    cols = ["image_id", "patient_id", "visit", "side", "image_path", "source", "low_quality", *VARIABLES,
            "pixel_spacing_mm", "film_path", "readprj", "barcode", "joint_row_px", "joint_col_px", "joint_score"]
    if not crops:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(crops)
    keys = df["image_id"].str.rsplit("_", n=2, expand=True)
    df["patient_id"], df["visit"] = keys[0], keys[2].str[1:].astype(int)
    df["image_path"] = [target.manifest_path(target.crop_file(i)) for i in df["image_id"]]
    df["source"], df["low_quality"] = "oai", False
    df = df.merge(readings.drop(columns="table_row"), on=["patient_id", "visit", "side"], how="left")
    df = df.merge(films[["patient_id", "visit", "barcode"]], on=["patient_id", "visit"], how="left")
    for col in (*VARIABLES, "readprj"):
        df[col] = df[col].astype("Float64").round().astype("Int64")
    return df[cols].sort_values("image_id").reset_index(drop=True)
