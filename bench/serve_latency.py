"""Latency of `kneeoa serve` per film: p50 and p95, one upload at a time and 20 at once, on loopback.

    nice -n 19 .venv/bin/python bench/serve_latency.py MODEL_DIR [--films N] [--threads 2]

Writes phantom bilateral DICOM films (0.15 mm pixels, the archive-like size) into a temporary folder, starts the
real server (uvicorn) on 127.0.0.1 on a free port, uploads each film sequentially, then 20 concurrently, and prints
per-film latencies. torch is limited to `--threads` threads, so the figures are for a 2-core server.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    from deploy_fixtures import LiveServer
    from kneeoa.deploy.serve import create_app
    from kneeoa.synthetic.phantom.films import write_phantom_release

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--films", type=int, default=6, help="distinct phantom films (patients)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrent", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        truth = write_phantom_release(Path(tmp), patients=args.films, visits=1, seed=1, spacings_mm=(0.15,),
                                      workers=1)
        films = [Path(tmp) / p for p in sorted(set(truth.loc[truth["has_film"], "film_path"]))]
        sizes = [f.stat().st_size / 2**20 for f in films]
        server = LiveServer(create_app(args.model_dir)).start()
        try:
            def post(path: Path) -> float:
                t0 = time.perf_counter()
                r = httpx.post(f"{server.url}/api/predict", files={"file": (path.name, path.read_bytes())},
                               timeout=600)
                if r.status_code != 200 or len(r.json()["knees"]) != 2:
                    raise RuntimeError(f"{path}: {r.status_code} {r.text[:300]}")
                return time.perf_counter() - t0

            post(films[0])  # warm-up: first-use imports and allocations
            seq = np.array([post(f) for f in films])
            batch = [films[i % len(films)] for i in range(args.concurrent)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrent) as pool:
                conc = np.array(list(pool.map(post, batch)))
            wall = time.perf_counter() - t0
        finally:
            server.stop()
    print(f"films: {len(films)} bilateral DICOM, {min(sizes):.1f}-{max(sizes):.1f} MB; torch threads {args.threads}")
    print(f"sequential: p50 {np.percentile(seq, 50):.2f} s, p95 {np.percentile(seq, 95):.2f} s per film")
    print(f"{args.concurrent} concurrent: all answered (2 knees each); wall {wall:.1f} s "
          f"({wall / args.concurrent:.2f} s/film); per-request p50 {np.percentile(conc, 50):.1f} s, "
          f"p95 {np.percentile(conc, 95):.1f} s (queued behind each other)")


if __name__ == "__main__":
    main()
