"""One ablation-table row per KLG arm of a run folder, on val: the figures docs/results.md quotes.

For every `predictions/<arm>__klg.parquet`: quadratic kappa with its patient-bootstrap 95 % CI, accuracy, balanced
accuracy, KL1 and KL4 recall, under the arm's own decoding (`y_pred`), under argmax, and with the cut-points
cross-fitted on val (tuned on one half of the val patients, applied to the other half, and the other way round):
the stored decoding tunes its cut-points on all of val, so its val kappa is optimistic; the cross-fitted figure is
not. Test rows are never read.

    .venv/bin/python bench/kl_summary.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd


def cross_fitted(y: np.ndarray, probs: np.ndarray, patients: np.ndarray, seed: int = 0) -> np.ndarray:
    """Classes from cut-points tuned on the other half of the patients (two folds by patient)."""
    from kneeoa.models.heads import apply_cutpoints, tune_cutpoints

    ids = np.unique(patients)
    half = set(np.random.default_rng(seed).permutation(ids)[: len(ids) // 2])
    fold = np.array([p in half for p in patients])
    pred = np.empty(len(y), dtype="int64")
    for f in (True, False):
        cuts = tune_cutpoints(y[fold != f], probs[fold != f])
        pred[fold == f] = apply_cutpoints(probs[fold == f], cuts)
    return pred


def rows(run_dir: Path, n_boot: int = 1000) -> list[dict]:
    from kneeoa import bootstrap
    from kneeoa.data.manifest import read_manifest
    from kneeoa.metrics import METRICS
    from kneeoa.runfolder.predictions import prob_columns, read_predictions

    patients = read_manifest(run_dir).set_index("image_id")["patient_id"]
    out = []
    for path in sorted((run_dir / "predictions").glob("*__klg.parquet")):
        arm, _, table = read_predictions(path)
        val = table[table["split"] == "val"]
        y, probs = val["y_true"].to_numpy(), val[prob_columns(5)].to_numpy()
        pid = patients.loc[val["image_id"]].to_numpy()
        codes, n_pat = bootstrap.patient_codes(pid)
        w = bootstrap.bootstrap_weights(codes, n_pat, n_boot, np.random.default_rng(0))
        kappa = METRICS.get("kappa_quadratic").fn
        for decoding, pred in (("stored", val["y_pred"].to_numpy()), ("argmax", probs.argmax(1)),
                               ("cross-fitted cut-points", cross_fitted(y, probs, pid))):
            ci = bootstrap.bootstrap_ci(y, probs, w, point=kappa, weighted=METRICS.get("kappa_quadratic").weighted_fn,
                                    pred=pred)
            out.append({"run": run_dir.name, "arm": arm, "decoding": decoding, "kappa": round(ci.value, 3),
                        "ci": f"[{ci.low:.3f}, {ci.high:.3f}]", "accuracy": round(float(np.mean(pred == y)), 3),
                        "balanced_accuracy": round(METRICS.get("balanced_accuracy").fn(y, probs, pred), 3),
                        "KL1_recall": round(float(np.mean(pred[y == 1] == 1)), 3),
                        "KL4_recall": round(float(np.mean(pred[y == 4] == 4)), 3), "n": len(y)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    table = pd.DataFrame([r for run in args.runs for r in rows(run)])
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
