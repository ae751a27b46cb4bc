"""Knee localisation on a `kneeoa crop-films` set: how many real knees are cropped right, quarantined or cropped
wrong, and whether any missing leg or implant was cropped.

    .venv/bin/python bench/localize_films.py FILMS_DIR [FILMS_DIR ...] [--localizer heatmap] [--workers 2]

Films composed from val crops measure; films from train crops tune (`kneeoa crop-films --split train`).
`--exposure wide` film sets (underexposed, washed-out and saturated films) are where exposure handling shows.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    from kneeoa.localize.check import score_film_set

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", type=Path, nargs="+")
    ap.add_argument("--localizer", default="heatmap")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--show", type=int, default=8, help="quarantined or wrong knees to list")
    args = ap.parse_args()
    print("| films | localiser | real knees | ok (<= 10 mm) | quarantined | wrong crop | missing/implant cropped | "
          "seconds |\n|---|---|---|---|---|---|---|---|")
    for folder in args.folders:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            scored = score_film_set(folder, Path(tmp), localizer=args.localizer, workers=args.workers)
            seconds = time.perf_counter() - t0
        knees = scored[scored["content"] == "knee"]
        others = scored[scored["content"] != "knee"]
        counts = knees["verdict"].value_counts()
        print(f"| {folder.name} ({scored['film'].nunique()}) | {args.localizer} | {len(knees)} | {counts.get('ok', 0)} "
              f"| {counts.get('quarantined', 0)} | {counts.get('wrong', 0)} | "
              f"{int((others['verdict'] == 'wrong').sum())} of {len(others)} | {seconds:.0f} |")
        bad = knees[knees["verdict"] != "ok"].head(args.show)
        for row in bad.itertuples():
            print(f"    {Path(row.film).name} {row.side}: {row.verdict} {row.reason or f'{row.err_mm:.1f} mm'}")


if __name__ == "__main__":
    main()
