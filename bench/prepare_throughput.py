"""Film throughput and localisation accuracy of the film -> knee-crop step, on phantom or real-knee films.

Two film sources:

- phantom (default): writes (or reuses) a phantom OAI-shaped release and scores the joint centres against its
  truth.csv; a film counts when both knees are within --tolerance-mm (5 mm).
- real knees (--crop-films DIR): a film set from `kneeoa crop-films` (or, with --from-crops, one written here from a
  kneeKL224 folder at --spacing-mm), scored per knee: found within --tolerance-mm (10 mm), wrong crops (a crop of a
  missing or implant knee, or beyond tolerance), side swaps, quarantined knees and their reasons; each miss's offset in
  its source crop's frame (down the leg, across), and the missed knees' source crops drawn to --out/misses.png.

Either way the importer's film work (DICOM decode, localise, two 16-bit crops) runs with each --workers count and
films/s are printed.

    python bench/prepare_throughput.py --patients 8 --visits 2 --seed 2 --out /tmp/bench_phantom
    kneeoa crop-films ../shared/data/kneeKL224 /tmp/val_films --split val --films 250 --seed 1
    python bench/prepare_throughput.py --crop-films /tmp/val_films --workers 2
    python bench/prepare_throughput.py --crop-films /tmp/films_02 --from-crops ../shared/data/kneeKL224 \\
        --split val --films 20 --spacing-mm 0.2 0.2 --workers 1 2
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from kneeoa.config import DataCfg
from kneeoa.localize.check import score_film_set
from kneeoa.localize.films import FilmJob, run_film_jobs
from kneeoa.synthetic.crop_films import VARIETY, write_crop_films
from kneeoa.synthetic.phantom.films import read_truth, write_phantom_release


def phantom(args: argparse.Namespace) -> None:
    release = args.out / "release"
    if not (release / "truth.csv").exists():
        t0 = time.perf_counter()
        write_phantom_release(release, patients=args.patients, visits=args.visits, seed=args.seed,
                              low_quality_share=args.low_quality_share, spacings_mm=tuple(args.spacing_mm))
        print(f"release written in {time.perf_counter() - t0:.0f} s -> {release}")
    truth = read_truth(release)
    filmed = truth[truth["has_film"]]
    films = filmed.groupby("film_path")
    print(f"{films.ngroups} films, spacings {sorted(filmed['pixel_spacing_mm'].round(3).unique())} mm, "
          f"encodings {sorted(filmed['encoding'].unique())}, localiser {args.localizer}")
    outcomes = None
    for workers in args.workers:
        crops = args.out / f"crops_w{workers}"
        shutil.rmtree(crops, ignore_errors=True)
        jobs = [FilmJob(release / path, dict(zip(g["side"], g["image_id"], strict=True)), "bilateral", crops,
                        crop_mm=DataCfg.crop_mm, image_size=args.image_size, localizer=args.localizer, dicom=True)
                for path, g in films]
        t0 = time.perf_counter()
        outcomes = run_film_jobs(jobs, workers=workers, desc=f"{workers} worker(s)")
        dt = time.perf_counter() - t0
        print(f"workers={workers}: {len(jobs)} films in {dt:.1f} s = {len(jobs) / dt:.2f} films/s")
    rows = [{**c, "reason": o.reason} for o in outcomes for c in o.crops]
    rows += [{"image_id": i, "reason": o.reason} for o in outcomes if o.reason for i in o.job.image_ids.values()
             if i not in {c["image_id"] for c in o.crops}]
    got = pd.DataFrame(rows).merge(filmed, on="image_id", suffixes=("", "_truth"))
    got["err_mm"] = np.hypot(got["joint_row_px"] - got["joint_row_px_truth"],
                             got["joint_col_px"] - got["joint_col_px_truth"]) * got["pixel_spacing_mm_truth"]
    per_film = got.groupby("film_path").agg(err_mm=("err_mm", "max"), reason=("reason", "first"),
                                            low_quality=("low_quality", "any"))
    per_film["err_mm"] = per_film["err_mm"].fillna(np.inf)  # a quarantined knee makes its film a miss
    ok = per_film["err_mm"] <= args.tolerance_mm
    print(f"films with both joint centres within {args.tolerance_mm:g} mm: {ok.sum()}/{len(per_film)} = "
          f"{100 * ok.mean():.1f} %  (quarantined: {per_film['reason'].notna().sum()})")
    errs = got["err_mm"].replace(np.inf, np.nan).dropna()
    print(f"knee error mm: median {errs.median():.2f}, p95 {errs.quantile(0.95):.2f}, max {errs.max():.2f}")
    print("worst films:")
    print(per_film.sort_values("err_mm", ascending=False).head(5).to_string())


def real(args: argparse.Namespace) -> None:
    folder = args.crop_films
    if args.from_crops and not (folder / "truth.csv").exists():
        variety = replace(VARIETY, spacing_mm=tuple(args.spacing_mm))
        t0 = time.perf_counter()
        write_crop_films(args.from_crops, folder, split=args.split, films=args.films, seed=args.seed,
                         variety=variety, workers=max(args.workers))
        print(f"films written in {time.perf_counter() - t0:.0f} s -> {folder}")
    scored = None
    for workers in args.workers:
        crops = args.out / f"crops_w{workers}"
        shutil.rmtree(crops, ignore_errors=True)
        t0 = time.perf_counter()
        scored = score_film_set(folder, crops, localizer=args.localizer, tolerance_mm=args.tolerance_mm,
                                workers=workers)
        dt = time.perf_counter() - t0
        n = scored["film"].nunique()
        print(f"workers={workers}: {n} films in {dt:.1f} s = {n / dt:.2f} films/s")
    knees = scored[scored["content"] == "knee"]
    others = scored[scored["content"] != "knee"]
    ok = knees["verdict"] == "ok"
    print(f"{scored['film'].nunique()} films ({dict(scored.groupby('kind')['film'].nunique())}), spacings "
          f"{scored['spacing_mm'].min():.3f}-{scored['spacing_mm'].max():.3f} mm, localiser {args.localizer}")
    print(f"knees found within {args.tolerance_mm:g} mm: {ok.sum()}/{len(knees)} = {100 * ok.mean():.2f} %")
    print(f"wrong crops: {(scored['verdict'] == 'wrong').sum()} (of real knees {(knees['verdict'] == 'wrong').sum()}, "
          f"of missing/implant positions {(others['verdict'] == 'wrong').sum()}/{len(others)}); "
          f"side swaps: {int(scored['swapped'].sum())}")
    print(f"real knees quarantined: {(knees['verdict'] == 'quarantined').sum()}; missing/implant refused: "
          f"{(others['verdict'] == 'refused').sum()}/{len(others)}")
    errs = knees["err_mm"].dropna()
    print(f"knee error mm: median {errs.median():.2f}, p95 {errs.quantile(0.95):.2f}, max {errs.max():.2f}")
    print(f"knee offset in the source crop's frame, mm: down the leg median {knees['down_mm'].median():+.2f}, "
          f"across median {knees['across_mm'].median():+.2f}")
    misses = scored[scored["verdict"].isin(["wrong", "quarantined"])]
    if len(misses):
        print(misses[["film", "side", "content", "verdict", "err_mm", "down_mm", "across_mm", "reason"]]
              .round(1).to_string(max_colwidth=80))
        draw_misses(misses[misses["content"] == "knee"], args.out / "misses.png")


def draw_misses(misses: pd.DataFrame, out: Path, size: int = 224) -> None:
    """The source crops of the real knees missed or cropped off target, side by side: a white cross at the crop's
    centre (the truth), a black ring where the localiser put the joint centre (none when quarantined)."""
    from PIL import Image, ImageDraw

    from kneeoa.synthetic.crop_films import load_crop

    if misses.empty:
        return
    sheet = Image.new("L", (size * len(misses), size))
    for i, m in enumerate(misses.itertuples(index=False)):
        tile = Image.fromarray((load_crop(m.crop_path) * 255).astype(np.uint8)).resize((size, size))
        draw = ImageDraw.Draw(tile)
        c = size / 2
        draw.line([(c - 8, c), (c + 8, c)], fill=255, width=2)
        draw.line([(c, c - 8), (c, c + 8)], fill=255, width=2)
        if np.isfinite(m.down_mm):
            px = size / m.crop_mm
            r, q = c + m.down_mm * px, c + m.across_mm * px
            draw.ellipse([(q - 7, r - 7), (q + 7, r + 7)], outline=0, width=2)
        draw.text((4, 4), f"{Path(m.film).stem} {m.side} {m.verdict}", fill=255)
        sheet.paste(tile, (size * i, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"missed knees' source crops -> {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/kneeoa_bench"))
    ap.add_argument("--localizer", default=DataCfg.localizer)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tolerance-mm", type=float, default=None, help="default: 5 (phantom), 10 (real knees)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spacing-mm", type=float, nargs="+", default=None,
                    help="phantom: spacings to draw from (default 0.14 0.15 0.175 0.2); real: LO HI range")
    ap.add_argument("--patients", type=int, default=12)
    ap.add_argument("--visits", type=int, default=2)
    ap.add_argument("--low-quality-share", type=float, default=0.0)
    ap.add_argument("--image-size", type=int, default=DataCfg.image_size)
    ap.add_argument("--crop-films", type=Path, default=None, help="film set with truth.csv (kneeoa crop-films)")
    ap.add_argument("--from-crops", type=Path, default=None, help="kneeKL224 folder to write --crop-films from")
    ap.add_argument("--split", default="val")
    ap.add_argument("--films", type=int, default=20)
    args = ap.parse_args()
    if args.crop_films:
        args.tolerance_mm = args.tolerance_mm or 10.0
        args.spacing_mm = args.spacing_mm or list(VARIETY.spacing_mm)
        real(args)
    else:
        args.tolerance_mm = args.tolerance_mm or 5.0
        args.spacing_mm = args.spacing_mm or [0.14, 0.15, 0.175, 0.2]
        phantom(args)


if __name__ == "__main__":
    main()
