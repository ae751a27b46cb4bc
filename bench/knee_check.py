"""How the knee check answers real knees, real non-knees and composed negatives, through the real `predict` path.

    .venv/bin/python bench/knee_check.py [--model NAME_OR_DIR] [--films FILMS_DIR] [--json OUT.json]

Rows (each a share of files refused, i.e. given no grade, with the reason in `error`):
- val knee crops of kneeKL224 (`../shared/data/kneeKL224/val`, side from labels.csv): should be ~0;
- every source folder of `../shared/data/nonknee_dev` (real chest and hand radiographs): should be ~1;
- every file of pydicom's own test corpus (CT, MR, NM, US, RT, SR, secondary captures, CR of the spine): ~1;
- composed negatives written here: flat, noise, gradients, photographs (scikit-learn's samples, colour and grey),
  phantom chest and hand films, and knee crops made wrong (rotated, upside down, off the joint, zoomed out);
- with --films (a `kneeoa crop-films` folder of val films): the share of true knees graded, and of knees the
  localiser found that the knee check refused.

The check is fitted on knees alone (`kneeoa.models.knee_check`), and its threshold is a share of knees, so no
negative source takes part in fitting it: every negative row is a held-out-source figure.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path("../shared/data")


def refused(table: pd.DataFrame) -> pd.Series:
    """Per file: True when none of its rows got a grade."""
    graded = table["error"].fillna("").eq("")
    return ~graded.groupby(table["file"]).any()


def phantom_chest(rng: np.random.Generator, n: int = 256) -> np.ndarray:
    """A PA chest-like film: bright body, two dark lungs, rib arcs, a spine and a heart shadow."""
    y, x = np.mgrid[0:n, 0:n] / n
    img = 0.55 + 0.1 * rng.random() - 0.3 * ((x - 0.5) ** 2 * 4 > 0.95)
    for cx in (0.3, 0.7):
        lung = ((x - cx) / 0.17) ** 2 + ((y - 0.5) / 0.33) ** 2 < 1
        img = np.where(lung, img - 0.35, img)
    for k in range(9):
        ribs = np.abs(y - 0.22 - 0.065 * k - 0.12 * (x - 0.5) ** 2) < 0.008 + 0.004 * rng.random()
        img = np.where(ribs & ((x - 0.5) ** 2 < 0.12), img + 0.2, img)
    img = np.where(np.abs(x - 0.5) < 0.05, img + 0.25, img)
    img = np.where(((x - 0.55) / 0.12) ** 2 + ((y - 0.62) / 0.14) ** 2 < 1, img + 0.2, img)
    return np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)


def phantom_hand(rng: np.random.Generator, n: int = 256) -> np.ndarray:
    """A PA hand-like film: a palm and five fingers of bright phalanges on a dark background."""
    y, x = np.mgrid[0:n, 0:n] / n
    img = np.full((n, n), 0.05)
    img = np.where(((x - 0.5) / 0.22) ** 2 + ((y - 0.72) / 0.18) ** 2 < 1, 0.35, img)
    for k, cx in enumerate((0.22, 0.36, 0.5, 0.63, 0.76)):
        top = 0.35 if k else 0.5
        for j, (a, b) in enumerate(((top, top + 0.1), (top + 0.11, top + 0.2), (top + 0.21, 0.62))):
            bone = (np.abs(x - cx) < 0.025 - 0.003 * j) & (y > a) & (y < b)
            img = np.where(bone, 0.75, img)
    return np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)


def composed_negatives(out: Path, knees: list[Path], rng: np.random.Generator, per_kind: int = 30
                       ) -> dict[str, list[Path]]:
    """Write the composed negative images (PNG) into `out`; {kind: files}."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from kneeoa.formats.images import load_gray, save_gray16

    made: dict[str, list[Path]] = {}

    def put(kind: str, i: int, img: np.ndarray) -> None:
        path = out / f"{kind}_{i:03d}.png"
        save_gray16(np.clip(img, 0, 1), path)
        made.setdefault(kind, []).append(path)

    photos = load_sample_images().images
    for i in range(per_kind):
        n = 224
        put("flat", i, np.full((n, n), rng.uniform(0, 1)))
        put("noise", i, rng.normal(0.5, rng.uniform(0.05, 0.3), (n, n)))
        yy, xx = np.mgrid[0:n, 0:n] / n
        angle = rng.uniform(0, 2 * np.pi)
        put("gradient", i, 0.5 + 0.5 * (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)))
        put("phantom_chest", i, phantom_chest(rng))
        put("phantom_hand", i, phantom_hand(rng))
        photo = photos[i % len(photos)]
        r0, c0 = rng.integers(0, photo.shape[0] - 224), rng.integers(0, photo.shape[1] - 224)
        patch = photo[r0:r0 + 224, c0:c0 + 224]
        colour = out / f"photo_colour_{i:03d}.jpg"
        Image.fromarray(patch).save(colour)
        made.setdefault("photo_colour", []).append(colour)
        put("photo_grey", i, patch.mean(axis=2) / 255.0)
        knee = load_gray(knees[i % len(knees)])
        put("knee_rotated_90", i, np.rot90(knee))
        put("knee_upside_down", i, knee[::-1])
        h = knee.shape[0]
        shaft = knee[: h // 3]  # the femoral shaft, no joint
        put("knee_off_joint", i, np.asarray(Image.fromarray((shaft * 255).astype(np.uint8)).resize((h, h))) / 255.0)
        small = np.asarray(Image.fromarray((knee * 255).astype(np.uint8)).resize((h // 3, h // 3))) / 255.0
        canvas = np.full((h, h), float(np.median(knee[:5])))
        canvas[h // 3: h // 3 + h // 3, h // 3: h // 3 + h // 3] = small
        put("knee_zoomed_out", i, canvas)
    return made


def share(flags: pd.Series) -> str:
    return f"{flags.mean():.3f} ({int(flags.sum())}/{len(flags)})"


def main() -> None:
    import kneeoa
    from kneeoa.deploy.inputs import InputFile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="built-in name or package folder (default: the built-in)")
    ap.add_argument("--films", type=Path, default=None, help="a `kneeoa crop-films` folder of val films")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    grader = kneeoa.load_model(args.model)
    rows: list[tuple[str, str]] = []
    figures: dict[str, float] = {}

    def record(name: str, flags: pd.Series) -> None:
        rows.append((name, share(flags)))
        figures[name] = float(flags.mean())
        print(f"{name:40s} refused {share(flags)}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="kneecheck-bench-"))
    labels = pd.read_csv(DATA / "kneeKL224" / "labels.csv")
    val = labels[labels["split"] == "val"]
    files = [DATA / "kneeKL224" / f for f in val["path"]]
    t0 = time.perf_counter()
    table = grader.predict([InputFile(f, "crop", s) for f, s in zip(files, val["side"], strict=True)],
                           out=tmp / "val")
    seconds = time.perf_counter() - t0
    record("kneeKL224 val knee crops", refused(table))
    print(f"  ({len(files)} crops in {seconds:.1f} s: {len(files) / seconds:.0f} crops/s, knee check included)")
    for folder in sorted(p for p in (DATA / "nonknee_dev").iterdir() if p.is_dir()):
        record(f"nonknee_dev/{folder.name}", refused(grader.predict([folder], out=tmp / folder.name)))
    import pydicom

    corpus = Path(pydicom.__file__).parent / "data" / "test_files"
    dicoms = [p for p in sorted(corpus.rglob("*")) if p.is_file() and p.suffix not in (".txt", ".json", ".dump",
                                                                                      ".gz", ".icc")]
    table = grader.predict([InputFile(p) for p in dicoms], out=tmp / "pydicom")
    record("pydicom test corpus (every file)", refused(table))
    rng = np.random.default_rng(args.seed)
    train = labels[labels["split"] == "train"].sample(60, random_state=args.seed)
    made = composed_negatives(tmp / "composed", [DATA / "kneeKL224" / f for f in train["path"]], rng)
    for kind, paths in made.items():
        record(f"composed: {kind}", refused(grader.predict(paths, out=tmp / f"c_{kind}")))
    if args.films:
        from kneeoa.synthetic.crop_films import read_truth

        truth = read_truth(args.films)
        films = sorted(set(truth["film"]))
        t0 = time.perf_counter()
        table = grader.predict([Path(f) for f in films], out=tmp / "films")
        seconds = time.perf_counter() - t0
        knees = truth[truth["content"] == "knee"]
        graded = table[table["error"].fillna("").eq("")]
        check_refused = table["error"].fillna("").str.contains("knee check")
        found = table["knee_score"].notna()
        print(f"val films: {len(films)} films in {seconds:.1f} s ({len(films) / seconds:.1f} films/s); "
              f"{len(graded)} knees graded of {len(knees)} true knees ({len(graded) / len(knees):.3f}); "
              f"knee check refused {int(check_refused.sum())} of {int(found.sum())} knees found "
              f"({check_refused.sum() / max(1, found.sum()):.4f})")
        figures.update({"films_graded_share": len(graded) / len(knees),
                        "films_knee_check_refused_share": float(check_refused.sum() / max(1, found.sum())),
                        "films_per_s": len(films) / seconds})
    print("\n| images | refused |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
