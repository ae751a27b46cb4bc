"""How fast `kneeoa predict` grades, knee check included: crops per second and films per second.

    .venv/bin/python bench/predict_throughput.py [--model NAME_OR_DIR] [--crops 826] [--films FILMS_DIR] [--n-films 100]

Crops are kneeKL224 val crops (side from labels.csv); films are DICOM films of a `kneeoa crop-films` folder. Both go
through `kneeoa.load_model().predict`, the code `kneeoa predict` runs, writing crops and predictions.csv to a
temporary folder. The first batch is run once beforehand (model load, first-call allocations). Quote the CPU model
and the torch thread count with every figure; run with nothing else on the cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path("../shared/data/kneeKL224")


def main() -> None:
    import torch

    import kneeoa
    from kneeoa.deploy.inputs import InputFile
    from kneeoa.synthetic.crop_films import read_truth

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--crops", type=int, default=826)
    ap.add_argument("--films", type=Path, default=None)
    ap.add_argument("--n-films", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"CPU: {cpu}; {os.cpu_count()} cores; torch threads {torch.get_num_threads()}")
    grader = kneeoa.load_model(args.model)
    labels = pd.read_csv(DATA / "labels.csv").query("split == 'val'").head(args.crops)
    crops = [InputFile(DATA / p, "crop", s) for p, s in zip(labels["path"], labels["side"], strict=True)]
    with tempfile.TemporaryDirectory() as tmp:
        grader.predict(crops[: args.batch_size], out=Path(tmp) / "warm", batch_size=args.batch_size)
        t0 = time.perf_counter()
        table = grader.predict(crops, out=Path(tmp) / "crops", batch_size=args.batch_size)
        seconds = time.perf_counter() - t0
        graded = int(table["error"].fillna("").eq("").sum())
        print(f"crops: {len(crops)} in {seconds:.1f} s = {len(crops) / seconds:.1f} crops/s ({graded} graded)")
        if args.films:
            films = sorted(set(read_truth(args.films)["film"]))[: args.n_films]
            t0 = time.perf_counter()
            table = grader.predict([Path(f) for f in films], out=Path(tmp) / "films", batch_size=args.batch_size)
            seconds = time.perf_counter() - t0
            graded = int(table["error"].fillna("").eq("").sum())
            print(f"films: {len(films)} in {seconds:.1f} s = {len(films) / seconds:.2f} films/s ({graded} knees "
                  "graded)")


if __name__ == "__main__":
    main()
