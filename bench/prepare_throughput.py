"""Film throughput and localisation accuracy of the film -> knee-crop step, on phantom bilateral PA films.

Writes (or reuses) a phantom OAI-shaped release, then runs the importer's film work (DICOM decode, localise,
two 16-bit crops) over every film with 1 and 2 worker processes, and scores the localised joint centres against
the release's truth.csv.

    python bench/prepare_throughput.py --patients 12 --visits 2 --spacing-mm 0.14 0.15 0.175 0.2 --out /tmp/bench

Prints films/s per worker count, the share of films whose two joint centres are both within 5 mm of the truth,
error percentiles and the worst films.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from kneeoa.data.localize import FilmJob, run_film_jobs
from kneeoa.data.phantom_films import read_truth, write_phantom_release


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/kneeoa_bench"))
    ap.add_argument("--patients", type=int, default=12)
    ap.add_argument("--visits", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--low-quality-share", type=float, default=0.0)
    ap.add_argument("--spacing-mm", type=float, nargs="+", default=[0.14, 0.15, 0.175, 0.2])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--tolerance-mm", type=float, default=5.0)
    args = ap.parse_args()

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
          f"encodings {sorted(filmed['encoding'].unique())}")

    outcomes = None
    for workers in args.workers:
        crops = args.out / f"crops_w{workers}"
        shutil.rmtree(crops, ignore_errors=True)
        jobs = [FilmJob(release / path, dict(zip(g["side"], g["image_id"], strict=True)), "bilateral", crops,
                        image_size=args.image_size, dicom=True) for path, g in films]
        t0 = time.perf_counter()
        outcomes = run_film_jobs(jobs, workers=workers, desc=f"{workers} worker(s)")
        dt = time.perf_counter() - t0
        print(f"workers={workers}: {len(jobs)} films in {dt:.1f} s = {len(jobs) / dt:.2f} films/s "
              f"({2 * len(jobs) / dt:.2f} crops/s)")

    rows = [{**c, "reason": None} for o in outcomes for c in o.crops]
    rows += [{"image_id": i, "reason": o.reason} for o in outcomes if o.reason for i in o.job.image_ids.values()]
    got = pd.DataFrame(rows).merge(filmed, on="image_id", suffixes=("", "_truth"))
    got["err_mm"] = np.hypot(got["joint_row_px"] - got["joint_row_px_truth"],
                             got["joint_col_px"] - got["joint_col_px_truth"]) * got["pixel_spacing_mm_truth"]
    per_film = got.groupby("film_path").agg(err_mm=("err_mm", "max"), reason=("reason", "first"),
                                            low_quality=("low_quality", "any"))
    per_film["err_mm"] = per_film["err_mm"].fillna(np.inf)  # a quarantined film counts as a miss
    ok = per_film["err_mm"] <= args.tolerance_mm
    print(f"films with both joint centres within {args.tolerance_mm:g} mm: {ok.sum()}/{len(per_film)} = "
          f"{100 * ok.mean():.1f} %  (quarantined: {per_film['reason'].notna().sum()})")
    errs = got["err_mm"].replace(np.inf, np.nan).dropna()
    print(f"knee error mm: median {errs.median():.2f}, p95 {errs.quantile(0.95):.2f}, max {errs.max():.2f}")
    print("worst films:")
    print(per_film.sort_values("err_mm", ascending=False).head(5).to_string())


if __name__ == "__main__":
    main()
