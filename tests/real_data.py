"""Real images for tests that need them (`../shared/data`): kneeKL224 crops, non-knee radiographs, composed films.

Tests using these skip when the data folder is absent; nothing of it is ever copied into the repository.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KNEEKL224 = DATA / "kneeKL224"
NONKNEE = DATA / "nonknee_dev"

needs_kneekl224 = pytest.mark.skipif(not (KNEEKL224 / "labels.csv").exists(), reason="no ../shared/data/kneeKL224")
needs_nonknee = pytest.mark.skipif(not NONKNEE.is_dir(), reason="no ../shared/data/nonknee_dev")


def labels(split: str = "val") -> pd.DataFrame:
    table = pd.read_csv(KNEEKL224 / "labels.csv", dtype={"patient_id": str})
    return table[table["split"] == split].reset_index(drop=True)


def real_film(path: Path, *, patient_index: int = 0, seed: int = 0, missing: str | None = None
              ) -> tuple[Path, pd.DataFrame]:
    """A bilateral PA DICOM film composed from both val crops of one patient; returns (film, its two label rows).

    `missing` ("R" or "L") leaves that leg out of the film.
    """
    from kneeoa.formats.dicom import write_dicom
    from kneeoa.synthetic.crop_films import compose_film, load_crop

    val = labels("val")
    both = val.groupby("patient_id").filter(lambda g: set(g["side"]) == {"R", "L"})
    patient = sorted(both["patient_id"].unique())[patient_index]
    rows = both[both["patient_id"] == patient].sort_values("side", ascending=False)
    knees = {r.side: (load_crop(KNEEKL224 / r.path), "missing" if r.side == missing else "knee")
             for r in rows.itertuples()}
    film, _, _ = compose_film(knees, spacing_mm=0.2, rng=np.random.default_rng(seed))
    return write_dicom(film, path, spacing_mm=0.2, laterality="B"), rows
