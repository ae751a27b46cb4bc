"""How the side of the knee check's layout thumbnail trades knees kept against non-knees refused.

    .venv/bin/python bench/knee_check_thumb.py --films FILMS_DIR [--model NAME_OR_DIR] [--thumbs 8 12 16 24 32]

For each side, the check is fitted as `kneeoa export` fits it (`kneeoa.deploy.package.fit_knee_check`: the kneeKL224
train crops and two film-like copies of each, the grader's own features, seed 0), and scored on the crops `predict`
cuts (its knee check off): kneeKL224 val crops, the knees the localiser finds on the val films of FILMS_DIR (`kneeoa
crop-films ../shared/data/kneeKL224 FILMS_DIR --split val`), every `nonknee_dev` source and the composed negatives of
`bench/knee_check.py`. One row per side: the layout view alone, then the whole check (layout and features), as shares
refused. The features view does not depend on the side, so it is computed once.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path("../shared/data")


def cut_crops(grader, inputs: list, out: Path) -> tuple[list[np.ndarray], list[str], np.ndarray]:
    """The crops `predict` cuts from `inputs` with the knee check off: (crops, sides, source file of each)."""
    from kneeoa.formats.images import load_gray

    table = grader.predict(inputs, out=out, knee_check=False)
    table = table[table["crop"].fillna("").ne("")]
    crops = [load_gray(c if Path(c).is_absolute() else out / c) for c in table["crop"]]
    return crops, list(table["side"]), table["file"].astype(str).to_numpy()


def main() -> None:
    from knee_check import composed_negatives

    import kneeoa
    from kneeoa.formats.images import load_gray
    from kneeoa.models.knee_check import FILM_COPIES, KneeCheck, equalised, film_like, layout, right_knees
    from kneeoa.synthetic.crop_films import read_truth

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="built-in name or package folder (default: the built-in)")
    ap.add_argument("--films", type=Path, required=True, help="a `kneeoa crop-films` folder of val films")
    ap.add_argument("--thumbs", type=int, nargs="+", default=[8, 12, 16, 24, 32])
    ap.add_argument("--alpha", type=float, default=0.005)
    args = ap.parse_args()
    grader = kneeoa.load_model(args.model)
    model = grader._model
    tmp = Path(tempfile.mkdtemp(prefix="kneecheck-thumb-"))
    labels = pd.read_csv(DATA / "kneeKL224" / "labels.csv")
    train, val = labels[labels["split"] == "train"], labels[labels["split"] == "val"]
    crops = {"train": [load_gray(DATA / "kneeKL224" / p) for p in train["path"]]}
    sides = {"train": list(train["side"])}
    rng = np.random.default_rng(0)
    copies = [film_like(c, rng) for _ in range(FILM_COPIES) for c in right_knees(crops["train"], sides["train"])]
    crops["val"], sides["val"] = [load_gray(DATA / "kneeKL224" / p) for p in val["path"]], list(val["side"])
    sources: dict[str, np.ndarray] = {}
    films = sorted({Path(f) for f in read_truth(args.films)["film"]})
    crops["films"], sides["films"], _ = cut_crops(grader, films, tmp / "films")
    folders = sorted(p for p in (DATA / "nonknee_dev").iterdir() if p.is_dir())
    crops["nonknee"], sides["nonknee"], files = cut_crops(grader, folders, tmp / "nonknee")
    sources["nonknee"] = np.array([Path(f).parent.name for f in files])
    made = composed_negatives(tmp / "composed", [DATA / "kneeKL224" / f for f in train["path"][:60]],
                              np.random.default_rng(0))
    grey = {k: v for k, v in made.items() if k != "photo_colour"}  # colour photos never reach the check
    crops["composed"], sides["composed"] = [load_gray(p) for v in grey.values() for p in v], ["R"] * sum(
        len(v) for v in grey.values())
    sources["composed"] = np.array([k for k, v in grey.items() for _ in v])

    groups = train["patient_id"].astype(str).to_numpy()
    features = {k: model.features([equalised(c) for c in v], sides[k]) for k, v in crops.items()}

    def shares(passed: dict[str, np.ndarray]) -> dict[str, str]:
        row = {"val crops": f"{1 - passed['val'].mean():.4f}", "val-film knees": f"{1 - passed['films'].mean():.4f}"}
        for group in ("nonknee", "composed"):
            for name in np.unique(sources[group]):
                mask = sources[group] == name
                row[str(name)] = f"{1 - passed[group][mask].mean():.3f}"
        return row

    table = []
    for thumb in args.thumbs:
        lay = {k: np.stack([layout(c, thumb) for c in right_knees(v, sides[k])]) for k, v in crops.items()}
        check = KneeCheck.fit({"layout": lay["train"], "features": features["train"]}, groups,
                              film_layouts=np.stack([layout(c, thumb) for c in copies]),
                              film_groups=np.tile(groups, FILM_COPIES), alpha=args.alpha)
        tails = {k: check.view_scores({"layout": lay[k], "features": features[k]}) for k in crops if k != "train"}
        table.append({"thumb": thumb, "views": "layout",
                      **shares({k: t["layout"] >= check.threshold for k, t in tails.items()})})
        table.append({"thumb": thumb, "views": "layout + features",
                      **shares({k: np.minimum(*t.values()) >= check.threshold for k, t in tails.items()})})
        print(table[-1], flush=True)
    print("\nShare refused (knees: lower is better; every other column: higher is better)\n")
    cols = list(table[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in table:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
