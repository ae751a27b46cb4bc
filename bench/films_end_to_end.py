"""Films composed from real crops, graded end to end (localiser, knee check, grader): which true knees get a grade,
and whether a missing leg or an implant ever does.

    .venv/bin/python bench/films_end_to_end.py FILMS_DIR [FILMS_DIR ...] [--model NAME_OR_DIR]

FILMS_DIR is a `kneeoa crop-films` folder (truth.csv). A graded row is matched to its truth position by film and
side; its grade is compared with the source crop's KL grade (the crop's folder).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from sklearn.metrics import cohen_kappa_score

    import kneeoa
    from kneeoa.synthetic.crop_films import read_truth

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", type=Path, nargs="+")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    grader = kneeoa.load_model(args.model)
    print("| films | real knees | graded | refused by the knee check | not found by the localiser | missing/implant "
          "graded | kappa (graded) |\n|---|---|---|---|---|---|---|")
    for folder in args.folders:
        truth = read_truth(folder)
        with tempfile.TemporaryDirectory() as tmp:
            table = grader.predict([Path(f) for f in sorted(set(truth["film"]))], out=Path(tmp))
        table["side"] = table["side"].fillna("")
        merged = truth.merge(table, left_on=["film", "side"], right_on=["file", "side"], how="left")
        error = merged["error"].fillna("")
        graded = merged["klg"].notna()
        knees = merged["content"] == "knee"
        by_check = error.str.contains("knee check")
        grade = merged["crop_path"].str.extract(r"/(\d)/[^/]+$")[0].astype(float)
        k = knees & graded
        kappa = (cohen_kappa_score(grade[k].to_numpy(int), merged.loc[k, "klg"].to_numpy(int), weights="quadratic")
                 if k.any() else np.nan)
        print(f"| {folder.name} ({truth['film'].nunique()}) | {int(knees.sum())} | {int(k.sum())} "
              f"({k.sum() / knees.sum():.3f}) | {int((knees & by_check).sum())} | "
              f"{int((knees & ~graded & ~by_check).sum())} | {int((~knees & graded).sum())} of {int((~knees).sum())} "
              f"| {kappa:.3f} |")


if __name__ == "__main__":
    pd.set_option("display.width", 200)
    main()
