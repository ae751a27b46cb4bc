"""Patient-level train/val/test splits, stratified on KL grade.

Both knees and every visit of a patient go to one split: the paper's data have several visits per knee, so a
knee- or image-level split would put near-identical images on both sides.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kneeoa.errors import ConfigError
from kneeoa.sources.manifest import SPLITS


def assign_splits(df: pd.DataFrame, *, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                  seed: int = 0, stratify: str = "klg") -> pd.Series:
    """A split label per row, made by patient and stratified on each patient's worst `stratify` grade.

    Args:
        df: table with `patient_id` (and `stratify`, optional: without it the split is unstratified).
        fractions: train, val, test shares of patients; must sum to 1.
        seed: seeds a local numpy Generator (nothing global is touched).

    Returns:
        pd.Series of "train"/"val"/"test", aligned with `df`.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"split fractions must be three non-negative numbers summing to 1 (train, val, test). "
                          f"Got {list(fractions)}.")
    rng = np.random.default_rng(seed)
    if stratify in df and df[stratify].notna().any():
        stratum = pd.to_numeric(df[stratify], errors="coerce").groupby(df["patient_id"]).max().fillna(-1)
    else:
        stratum = pd.Series(0, index=pd.Index(df["patient_id"].unique(), name="patient_id"))
    assignment: dict[str, str] = {}
    carry = np.zeros(3)  # rounding remainders carried across strata keep the totals close to the fractions
    for _, patients in stratum.groupby(stratum):
        ids = patients.index.to_numpy().copy()
        rng.shuffle(ids)
        want = np.asarray(fractions) * len(ids) + carry
        counts = np.floor(want).astype(int)
        while counts.sum() < len(ids):
            counts[np.argmax(want - counts)] += 1
        carry = want - counts
        for name, part in zip(SPLITS, np.split(ids, np.cumsum(counts)[:-1]), strict=True):
            assignment.update(dict.fromkeys(part, name))
    return df["patient_id"].map(assignment).astype(str)
