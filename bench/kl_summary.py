"""One ablation-table row per KLG arm of a run folder, on val: the figures docs/results.md quotes.

For every `predictions/<arm>__klg.parquet`: quadratic kappa and accuracy with their patient-bootstrap 95 % CIs,
balanced accuracy, KL1, KL2 and KL4 recall, under the arm's own decoding (`y_pred`), under argmax, and with the
cut-points cross-fitted on val (tuned on one half of the val patients, applied to the other half, and the other way
round): the stored decoding tunes its cut-points on all of val, so its val kappa is optimistic; the cross-fitted figure
is not. Test rows are never read.

    .venv/bin/python bench/kl_summary.py RUN_DIR [RUN_DIR ...] [--cut-boot N] [--accuracy-weight W] [--halvings K]
        [--pool]

`--pool` scores the networks of all the given runs averaged as one ensemble instead (an offline ceiling for more
networks).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import yaml


def cross_fitted(y: np.ndarray, probs: np.ndarray, patients: np.ndarray, seed: int = 0, n_boot: int = 0,
                 accuracy_weight: float = 0.0) -> np.ndarray:
    """Classes from cut-points tuned on the other half of the patients (two folds by patient), the way the run tunes
    them (`n_boot`, `accuracy_weight`: its `cnn.cutpoint_bootstrap` and `cnn.cutpoint_accuracy_weight`)."""
    from kneeoa.models.cnn.heads import apply_cutpoints, tune_cutpoints

    ids = np.unique(patients)
    half = set(np.random.default_rng(seed).permutation(ids)[: len(ids) // 2])
    fold = np.array([p in half for p in patients])
    pred = np.empty(len(y), dtype="int64")
    for f in (True, False):
        cuts = tune_cutpoints(y[fold != f], probs[fold != f], groups=patients[fold != f], n_boot=n_boot,
                              accuracy_weight=accuracy_weight)
        pred[fold == f] = apply_cutpoints(probs[fold == f], cuts)
    return pred


def _cnn(run_dir: Path) -> dict:
    """The `cnn` section of the run's stored config."""
    return yaml.safe_load((run_dir / "config.yaml").read_text()).get("cnn") or {}


def _tuning(run_dir: Path, cut_boot: int | None, accuracy_weight: float | None) -> dict:
    """How the cross-fitted row tunes its cut-points: as given, else as the run did (`cnn.cutpoint_*`)."""
    cnn = _cnn(run_dir)
    return {"n_boot": cnn.get("cutpoint_bootstrap", 0) if cut_boot is None else cut_boot,
            "accuracy_weight": cnn.get("cutpoint_accuracy_weight", 0.0) if accuracy_weight is None
            else accuracy_weight}


def _val_klg(run_dir: Path, path: Path) -> tuple[str, pd.DataFrame, np.ndarray, np.ndarray]:
    """(arm, val rows, val labels, val probabilities) of one KLG prediction table, rows in image-id order."""
    from kneeoa.runfolder.predictions import prob_columns, read_predictions

    arm, _, table = read_predictions(path)
    val = table[table["split"] == "val"].sort_values("image_id", kind="stable")
    return arm, val, val["y_true"].to_numpy(), val[prob_columns(5)].to_numpy()


def score(label: str, arm: str, y: np.ndarray, probs: np.ndarray, stored: np.ndarray | None, pid: np.ndarray,
          tuning: dict, n_boot: int = 1000, halvings: int = 1) -> list[dict]:
    """The table's rows for one set of val probabilities: the `stored` decoding (when given), argmax and the
    cut-points cross-fitted on patient halves; `halvings` > 1 adds that row's kappa, accuracy, KL1 and KL2 recall
    averaged over as many random patient halvings (one halving is a noisy estimate)."""
    from kneeoa.stats import bootstrap
    from kneeoa.stats.metrics import METRICS

    codes, n_pat = bootstrap.patient_codes(pid)
    w = bootstrap.bootstrap_weights(codes, n_pat, n_boot, np.random.default_rng(0))
    kappa = METRICS.get("kappa_quadratic").fn
    crossed = [cross_fitted(y, probs, pid, seed=s, **tuning) for s in range(max(halvings, 1))]
    decodings = ([("stored", stored)] if stored is not None else []) + [
        ("argmax", probs.argmax(1)), ("cross-fitted cut-points", crossed[0])]
    out = []
    for decoding, pred in decodings:
        ci = {name: bootstrap.bootstrap_ci(y, probs, w, point=METRICS.get(name).fn, pred=pred,
                                           weighted=METRICS.get(name).weighted_fn)
              for name in ("kappa_quadratic", "accuracy")}
        kq, acc = ci["kappa_quadratic"], ci["accuracy"]
        out.append({"run": label, "arm": arm, "decoding": decoding, "kappa": round(kq.value, 3),
                    "ci": f"[{kq.low:.3f}, {kq.high:.3f}]", "accuracy": round(acc.value, 3),
                    "accuracy_ci": f"[{acc.low:.3f}, {acc.high:.3f}]",
                    "balanced_accuracy": round(METRICS.get("balanced_accuracy").fn(y, probs, pred), 3),
                    **{f"KL{k}_recall": round(float(np.mean(pred[y == k] == k)), 3) for k in (1, 2, 4)},
                    "n": len(y)})
    if halvings > 1:
        figures = np.array([(kappa(y, probs, pred=p), np.mean(p == y), np.mean(p[y == 1] == 1),
                             np.mean(p[y == 2] == 2)) for p in crossed])
        for name, value in zip(("kappa", "accuracy", "KL1_recall", "KL2_recall"), figures.mean(axis=0), strict=True):
            out[-1][f"{halvings}_halvings_{name}"] = round(float(value), 3)
    return out


def _patients(run_dir: Path, image_ids: pd.Series) -> np.ndarray:
    from kneeoa.sources.manifest import read_manifest

    return read_manifest(run_dir).set_index("image_id")["patient_id"].loc[image_ids].to_numpy()


def rows(run_dir: Path, n_boot: int = 1000, cut_boot: int | None = None, accuracy_weight: float | None = None,
         halvings: int = 1) -> list[dict]:
    """The table's rows for every KLG arm of one run folder (`score`), cut-points tuned as given or as the run did."""
    tuning = _tuning(run_dir, cut_boot, accuracy_weight)
    out = []
    for path in sorted((run_dir / "predictions").glob("*__klg.parquet")):
        arm, val, y, probs = _val_klg(run_dir, path)
        out += score(run_dir.name, arm, y, probs, val["y_pred"].to_numpy(), _patients(run_dir, val["image_id"]),
                     tuning, n_boot, halvings)
    return out


def pooled(run_dirs: list[Path], n_boot: int = 1000, cut_boot: int | None = None,
           accuracy_weight: float | None = None, halvings: int = 1) -> list[dict]:
    """The rows of every network of several runs averaged as one ensemble: each run's KLG arm with the most members
    (`<backbone>_ens`, else its one network), weighted by its number of networks (`cnn.ensemble_seeds`). The
    cut-points are tuned as the first run tunes them. An offline ceiling: what more networks would give, at the
    summed training time of the runs."""
    total, weight, first = None, 0, None
    for run_dir in run_dirs:
        paths = sorted((run_dir / "predictions").glob("*__klg.parquet"), key=lambda q: ("_ens__" not in q.name, q))
        if not paths:
            raise SystemExit(f"{run_dir}: no KLG prediction table under predictions/. Run its train stage first.")
        _, val, y, probs = _val_klg(run_dir, paths[0])
        k = max(1, int(_cnn(run_dir).get("ensemble_seeds", 1))) if "_ens__" in paths[0].name else 1
        if first is None:
            first = (val["image_id"].to_numpy(), y)
        elif not np.array_equal(val["image_id"].to_numpy(), first[0]):
            raise SystemExit(f"{run_dir}: its val images differ from {run_dirs[0]}'s; runs pool only on one val set.")
        total, weight = (probs * k if total is None else total + probs * k), weight + k
    label = "+".join(r.name for r in run_dirs) + f" ({weight} networks)"
    return score(label, "pooled", first[1], total / weight, None, _patients(run_dirs[0], pd.Series(first[0])),
                 _tuning(run_dirs[0], cut_boot, accuracy_weight), n_boot, halvings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--cut-boot", type=int, default=None,
                    help="cut-point bagging for the cross-fitted row (default: the run's cnn.cutpoint_bootstrap)")
    ap.add_argument("--accuracy-weight", type=float, default=None,
                    help="accuracy weight of the cross-fitted row's cut-points (default: the run's)")
    ap.add_argument("--halvings", type=int, default=1, help="also average the cross-fitted row over this many halvings")
    ap.add_argument("--pool", action="store_true",
                    help="score every network of the given runs averaged as one ensemble instead of each arm")
    args = ap.parse_args()
    tuning = {"cut_boot": args.cut_boot, "accuracy_weight": args.accuracy_weight, "halvings": args.halvings}
    table = pd.DataFrame(pooled(args.runs, **tuning) if args.pool else
                         [r for run in args.runs for r in rows(run, **tuning)])
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
