"""Do an arm's Grad-CAM and occlusion maps point at the same place, on real knees?

For `--n` knees of one split (seeded draw), both maps of the arm's predicted class are made exactly as `kneeoa explain`
makes them (`kneeoa.stages.explain.MAPS`, the run's config). Per knee: whether the two maps put most of their
energy in the same cell of a 3 x 3 grid, and their Pearson correlation. Control: each knee's Grad-CAM against the
next knee's occlusion map (same arm, other image), which must agree far less if the agreement is about the image.

    .venv/bin/python bench/explain_agreement.py RUN_DIR --arm twobranch_ens [--task klg] [--n 60] [-c CONFIG]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def peak_cell(m: np.ndarray, grid: int = 3) -> int:
    """The cell of a grid x grid partition of the map that holds most of its energy."""
    h, w = (s // grid * grid for s in m.shape)
    return int(np.argmax(m[:h, :w].reshape(grid, h // grid, grid, w // grid).sum(axis=(1, 3))))


def agreement(cams: list[np.ndarray], maps: list[np.ndarray]) -> tuple[float, float]:
    """(share of knees whose maps peak in the same 3 x 3 cell, median Pearson r), skipping all-zero maps."""
    pairs = [(c, m) for c, m in zip(cams, maps, strict=True) if c.std() > 0 and m.std() > 0]
    same = np.mean([peak_cell(c) == peak_cell(m) for c, m in pairs])
    r = np.median([np.corrcoef(c.ravel(), m.ravel())[0, 1] for c, m in pairs])
    return float(same), float(r)


def main() -> None:
    from kneeoa.config_checks import load_config
    from kneeoa.explain import cam
    from kneeoa.runfolder.manifest import read_manifest
    from kneeoa.runfolder.predictions import prediction_path, read_predictions
    from kneeoa.stages.explain import MAPS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--arm", required=True)
    ap.add_argument("--task", default="klg")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("-c", "--config", type=Path, help="study config (default: RUN/config.yaml)")
    args = ap.parse_args()
    cfg = load_config(args.config or args.run / "config.yaml")
    manifest = read_manifest(args.run)
    _, _, preds = read_predictions(prediction_path(args.run, args.arm, args.task))
    part = manifest[manifest["split"] == cfg.explain.split].merge(preds[["image_id", "y_pred"]], on="image_id")
    rows = part.iloc[np.sort(np.random.default_rng(0).choice(len(part), min(args.n, len(part)), replace=False))]
    classes = rows["y_pred"].to_numpy()
    out = {}
    for kind in ("gradcam", "occlusion"):
        t0 = time.perf_counter()
        maps = MAPS.get(kind).load(args.run, args.arm, args.task, cfg)(rows, classes)
        out[kind] = maps
        print(f"{kind}: {len(maps)} maps in {time.perf_counter() - t0:.1f} s")
    shape = out["gradcam"][0].shape
    out["occlusion"] = [cam.resize_map(m, shape) for m in out["occlusion"]]
    same, r = agreement(out["gradcam"], out["occlusion"])
    c_same, c_r = agreement(out["gradcam"], out["occlusion"][1:] + out["occlusion"][:1])
    print(f"{args.arm} {args.task}, {len(rows)} {cfg.explain.split} knees: same peak cell {same:.2f}, "
          f"median r {r:.2f}; control (another knee's occlusion map): same cell {c_same:.2f}, median r {c_r:.2f}")


if __name__ == "__main__":
    main()
