"""Throughput of `kneeoa embed` against the bare encoder forward pass, same batch size and precision.

    .venv/bin/python bench/embed_throughput.py [--weights DIR] [--encoder biomedclip] [--images 64] [--batch 16]

Without --weights a full-size random-weight BiomedCLIP snapshot (ViT-B/16 at 224 px + BERT-base, the published
architecture) is built in a temporary folder; the numbers do not depend on the weight values. Reports images/s of
(a) the bare forward on preprocessed tensors, (b) the embed stage's loop (PNG decoding, preprocessing, forward,
atomic shard writes), (c) the whole stage call including model load and checksum, and the ratio (b)/(a).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _make_run(run_dir: Path, n: int, size: int) -> None:
    from kneeoa.formats.images import save_gray16
    from kneeoa.sources.manifest import write_manifest

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        image_id = f"B{i // 2:04d}_{'RL'[i % 2]}_V00"
        save_gray16(rng.random((size, size)), run_dir / "crops" / f"{image_id}.png")
        rows.append({"image_id": image_id, "patient_id": f"B{i // 2:04d}", "visit": 0, "side": "RL"[i % 2],
                     "image_path": f"crops/{image_id}.png", "split": "train", "low_quality": False,
                     "source": "bench"})
    write_manifest(pd.DataFrame(rows), run_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--encoder", default="biomedclip")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224, help="crop size written to the run folder")
    args = ap.parse_args()

    from kneeoa.config import Config
    from kneeoa.models.encoders.foundation import create_encoder
    from kneeoa.stages.embed import embed_one

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = args.weights
        if weights is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from standins import build_biomedclip, build_raddino

            build = {"biomedclip": build_biomedclip, "rad-dino": build_raddino}[args.encoder]
            t = time.perf_counter()
            weights = build(tmp / "weights", full_size=True)
            print(f"built a full-size {args.encoder} stand-in in {time.perf_counter() - t:.0f} s")
        _make_run(tmp / "run", args.images, args.size)
        cfg = Config()
        cfg.foundation.batch_size = args.batch

        enc = create_encoder(args.encoder, weights, precision=cfg.foundation.precision)
        from kneeoa.formats.images import load_gray

        batch = enc.preprocess(np.stack([load_gray(p) for p in sorted((tmp / "run" / "crops").glob("*.png"))
                                         [:args.batch]]))
        enc.forward(batch)  # warm-up
        t = time.perf_counter()
        for _ in range(0, args.images, args.batch):
            enc.forward(batch)
        bare = args.images / (time.perf_counter() - t)
        del enc

        t = time.perf_counter()
        out = embed_one(tmp / "run", args.encoder, weights, cfg, progress=False)
        whole = args.images / (time.perf_counter() - t)
        loop = json.loads(out.with_suffix(".json").read_text())
        result = {"encoder": args.encoder, "images": args.images, "batch": args.batch, "precision": loop["precision"],
                  "bare_forward_img_s": round(bare, 2), "embed_loop_img_s": loop["images_per_s"],
                  "embed_stage_incl_load_img_s": round(whole, 2),
                  "ratio_loop_over_bare": round(loop["images_per_s"] / bare, 3)}
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
