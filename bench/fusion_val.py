"""Fused arms against their members on val, every arm decoded without seeing the knee it grades.

The report compares a fused arm with its best member as the run stored them. On a run whose test split is held out
(kneeKL224) that comparison is on val, where a CNN member's cut-points were tuned on every val knee (its val kappa
flatters it) while the stacker's val predictions are cross-fitted. Here every cut-point decoding is cross-fitted on
the stacker's own patient folds (RUN_DIR/fusion/fusion_stack/<task>.json): a member's cut-points for a fold are tuned
on the other folds, with the run's `cnn.cutpoint_bootstrap` and `cnn.cutpoint_accuracy_weight`. Arms decoded by
argmax stay as stored. Controls `stack(<member>)`: the same stacker, folds and decoding over one member alone, so
what a second member adds is told apart from what re-fitting a member's probabilities costs. Then each fused arm is
compared with each member (and the stacker with its controls) by a paired patient bootstrap (difference, 95 % CI,
p-value), for quadratic kappa, accuracy and balanced accuracy. Test rows are never read.

    .venv/bin/python bench/fusion_val.py RUN_DIR [--task klg] [--n-boot 1000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

METRIC_NAMES = ("kappa_quadratic", "accuracy", "balanced_accuracy")


def refit_cutpoints(y: np.ndarray, probs: np.ndarray, patients: np.ndarray, folds: np.ndarray, cnn: dict) -> np.ndarray:
    """Classes from cut-points tuned on the other folds, fold by fold (the run's cut-point settings)."""
    from kneeoa.models.cnn.heads import apply_cutpoints, tune_cutpoints

    pred = np.empty(len(y), dtype="int64")
    for k in np.unique(folds):
        held = folds == k
        cuts = tune_cutpoints(y[~held], probs[~held], groups=patients[~held], n_boot=cnn.get("cutpoint_bootstrap", 0),
                              accuracy_weight=cnn.get("cutpoint_accuracy_weight", 0.0))
        pred[held] = apply_cutpoints(probs[held], cuts)
    return pred


def fair_val(run_dir: Path, task: str) -> tuple[pd.DataFrame, dict[str, dict], list[dict]]:
    """(val rows: image_id, patient, fold, y; per arm {probs, pred, decoding}; the fused arms' records)."""
    from kneeoa.runfolder.arms import read_arms
    from kneeoa.runfolder.predictions import prob_columns, read_predictions
    from kneeoa.sources.manifest import read_manifest
    from kneeoa.tasks import get_task

    stack = json.loads((run_dir / "fusion" / "fusion_stack" / f"{task}.json").read_text())
    folds = pd.Series(stack["val_folds"])
    cnn = yaml.safe_load((run_dir / "config.yaml").read_text()).get("cnn") or {}
    patients = read_manifest(run_dir).set_index("image_id")["patient_id"]
    records = read_arms(run_dir)
    fused = [dict(r, arm=a) for a, r in sorted(records.items())
             if a.startswith("fusion_") and r["status"] == "ran"]
    arms = sorted({a for r in fused for a in r["details"]["members"]} | {r["arm"] for r in fused})
    rows = pd.DataFrame({"image_id": folds.index, "fold": folds.to_numpy()})
    rows["patient"] = patients.loc[rows["image_id"]].to_numpy()
    out: dict[str, dict] = {}
    for arm in arms:
        _, _, table = read_predictions(run_dir / "predictions" / f"{arm}__{task}.parquet")
        table = table.set_index("image_id").loc[rows["image_id"]]
        probs, y = table[prob_columns(get_task(task).n_classes)].to_numpy(), table["y_true"].to_numpy()
        rows["y"] = y
        stored_is_argmax = bool((table["y_pred"].to_numpy() == probs.argmax(1)).all())
        if stored_is_argmax or arm == "fusion_stack":
            out[arm] = {"probs": probs, "pred": table["y_pred"].to_numpy(),
                        "decoding": "cross-fitted (stored)" if arm == "fusion_stack" else "argmax (stored)"}
        else:
            out[arm] = {"probs": probs, "decoding": "cut-points cross-fitted on the stacker's folds",
                        "pred": refit_cutpoints(y, probs, rows["patient"].to_numpy(), rows["fold"].to_numpy(), cnn)}
    stack_rec = next((r for r in fused if r["arm"] == "fusion_stack"), None)
    if stack_rec is not None:
        out.update(single_member_stackers(rows, out, stack_rec["details"]["members"], stack, cnn, task))
    return rows, out, fused


def single_member_stackers(rows: pd.DataFrame, arms: dict[str, dict], members: list[str], stack: dict, cnn: dict,
                           task: str) -> dict[str, dict]:
    """Controls: the same stacker, folds and decoding over each member alone (`stack(<member>)`). Set against the
    fused stacker, they separate what the other member adds from what re-fitting a member's probabilities costs."""
    from kneeoa.models.stacking import Decoding, cross_fit, stack_inputs
    from kneeoa.tasks import get_task

    k = get_task(task).n_classes
    cutpoints = stack["stacker"]["decoding"]["method"] == "cutpoints"
    decoding = Decoding(cutpoints, cnn.get("cutpoint_bootstrap", 0), cnn.get("cutpoint_accuracy_weight", 0.0),
                        cnn.get("seed", 0))
    out = {}
    for member in members:
        probs, pred = cross_fit(stack_inputs([arms[member]["probs"]]), rows["y"].to_numpy(),
                                rows["patient"].to_numpy(), rows["fold"].to_numpy(), k, c=stack["c"],
                                decoding=decoding)
        out[f"stack({member})"] = {"probs": probs, "pred": pred, "decoding": "cross-fitted on the stacker's folds"}
    return out


def summary(run_dir: Path, task: str, n_boot: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    from kneeoa.stats import bootstrap
    from kneeoa.stats.metrics import METRICS

    rows, arms, fused = fair_val(run_dir, task)
    y = rows["y"].to_numpy()
    codes, n_pat = bootstrap.patient_codes(rows["patient"])
    w = bootstrap.bootstrap_weights(codes, n_pat, n_boot, np.random.default_rng(0))
    table = []
    for arm, a in arms.items():
        row = {"arm": arm, "decoding": a["decoding"]}
        for name in METRIC_NAMES:
            m = METRICS.get(name)
            ci = bootstrap.bootstrap_ci(y, a["probs"], w, point=m.fn, weighted=m.weighted_fn, pred=a["pred"])
            row[name] = f"{ci.value:.3f} [{ci.low:.3f}, {ci.high:.3f}]"
        for k in (1, 2):
            row[f"KL{k}_recall"] = round(float(np.mean(a["pred"][y == k] == k)), 3)
        table.append(row)
    pairs = []
    for rec in fused:
        controls = [a for a in arms if a.startswith("stack(")] if rec["arm"] == "fusion_stack" else []
        for member in rec["details"]["members"] + controls:
            for name in METRIC_NAMES:
                m = METRICS.get(name)
                res = bootstrap.paired_bootstrap(y, arms[rec["arm"]]["probs"], arms[member]["probs"], w, point=m.fn,
                                                 weighted=m.weighted_fn, pred_a=arms[rec["arm"]]["pred"],
                                                 pred_b=arms[member]["pred"])
                pairs.append({"fused": rec["arm"], "member": member, "metric": name,
                              "difference": f"{res.difference:+.3f} [{res.low:+.3f}, {res.high:+.3f}]",
                              "p": round(float(res.p_value), 4)})
    return pd.DataFrame(table), pd.DataFrame(pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--task", default="klg")
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()
    table, pairs = summary(args.run, args.task, args.n_boot)
    n = len(json.loads((args.run / "fusion" / "fusion_stack" / f"{args.task}.json").read_text())["val_folds"])
    print(f"{args.run} {args.task}, val, {n} knees, patient bootstrap {args.n_boot}\n")
    print(table.to_string(index=False))
    print()
    print(pairs.to_string(index=False))


if __name__ == "__main__":
    main()
