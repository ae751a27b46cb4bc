"""Checkpoint ensembles on val: each seed's best k epochs, or its last n, averaged over the ensemble's seeds.

The run keeps one epoch per network, the best by val kappa. Averaging a network's several good epochs (a checkpoint
ensemble) or its last epochs (the prediction-space cousin of SWA) would cost no training time, only prediction.
This scores both from a run trained with `cnn.keep_epoch_weights: true`, in the rows `bench/kl_summary.py` prints
(cross-fitted over `--halvings` patient halvings, cut-points tuned as the run tunes them). `top 1` is the run's own
ensemble arm (the first of equal scores, as the checkpoint keeps it), a check that the files are the run's. Val only.

    .venv/bin/python bench/epoch_ensembles.py RUN_DIR [--top 1 2 3 5] [--last 5 10 20] [--halvings 6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from kl_summary import _tuning, score  # noqa: E402


def epoch_probs(run_dir: Path) -> tuple[pd.DataFrame, dict[int, list[tuple[int, float, np.ndarray]]]]:
    """(val rows in image-id order, seed -> [(epoch, val score, val KLG probabilities), ...]) of the run's first
    backbone, each epoch's weights loaded into its seed's member of the ensemble arm."""
    from kneeoa.models.cnn.epoch_weights import read_epoch_weights
    from kneeoa.models.cnn.infer import CnnPredictor, read_members
    from kneeoa.runfolder.checkpoints import CHECKPOINTS_DIR, checkpoint_path
    from kneeoa.sources.manifest import read_manifest
    from kneeoa.transforms.cache import image_cache

    cnn = yaml.safe_load((run_dir / "config.yaml").read_text()).get("cnn") or {}
    backbone, group = cnn["backbones"][0], "multitask" if cnn.get("multitask", True) else "klg"
    members = {p["extra"]["seed"]: p for p in read_members(checkpoint_path(run_dir, f"{backbone}_ens", group))}
    manifest = read_manifest(run_dir)
    images = image_cache(run_dir, manifest, int(cnn["image_size"]), progress=False)
    val = manifest[(manifest["split"] == "val") & manifest["klg"].notna()].sort_values("image_id", kind="stable")
    val_images = np.asarray(images[manifest.index.get_indexer(val.index)])
    out = {}
    for seed, epochs in read_epoch_weights(run_dir / CHECKPOINTS_DIR / backbone / "lightning", group).items():
        payload = members[seed]
        out[seed] = []
        for e in epochs:
            predictor = CnnPredictor.from_payloads([{**payload, "state_dict": e["state_dict"]}])
            out[seed].append((e["epoch"], e["val_score"], predictor.predict_uint8(val_images)["klg"]))
            print(f"seed {seed} epoch {e['epoch']}", file=sys.stderr, flush=True)
    return val, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--top", type=int, nargs="*", default=[1, 2, 3, 5], help="each seed's k best epochs by val score")
    ap.add_argument("--last", type=int, nargs="*", default=[5, 10, 20], help="each seed's last n epochs")
    ap.add_argument("--halvings", type=int, default=6)
    args = ap.parse_args()
    try:
        val, seeds = epoch_probs(args.run)
    except FileNotFoundError as e:
        raise SystemExit(f"{args.run}: {e}") from None
    y, pid = val["klg"].to_numpy().astype(int), val["patient_id"].to_numpy()
    tuning = _tuning(args.run, None, None)
    picks = {f"top {k}": lambda eps, k=k: sorted(eps, key=lambda e: (-e[1], e[0]))[:k] for k in args.top}
    picks |= {f"last {n}": lambda eps, n=n: eps[-n:] for n in args.last}
    rows = []
    for name, pick in picks.items():
        chosen = {seed: pick(eps) for seed, eps in seeds.items()}
        probs = np.mean([e[2] for eps in chosen.values() for e in eps], axis=0)
        epochs = "; ".join(f"seed {s}: " + ",".join(str(e[0]) for e in eps) for s, eps in chosen.items())
        row = score(args.run.name, name, y, probs, None, pid, tuning, halvings=args.halvings)[-1]
        rows.append({**row, "epochs": epochs})
    cols = ["arm", "kappa", "ci", "accuracy", "accuracy_ci", f"{args.halvings}_halvings_kappa",
            f"{args.halvings}_halvings_accuracy", "epochs"]
    print(pd.DataFrame(rows)[[c for c in cols if c in rows[0]]].to_string(index=False))


if __name__ == "__main__":
    main()
