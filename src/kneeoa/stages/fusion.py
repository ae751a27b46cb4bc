"""Stage `fusion`: hybrid arms over arms that already ran, the study's proposed future work.

The members are `fusion.arms` (at least two: CNN arms, embedding arms, any arm with prediction tables). Methods
(`fusion.methods`, a registry):

- `stack` -> arm `fusion_stack`: a logistic stacker over the members' class probabilities
  (`kneeoa.models.stacking`). It is fitted on val only, by patient-grouped cross-fitting, so each val prediction
  comes from a stacker that never saw that patient; the stacker fitted on all of val is applied unchanged to test.
  Test rows never reach a fit. Its table holds val and test rows only (the members' train probabilities are
  in-sample and would teach the stacker to trust them).
- `features` -> arms `fusion_features_<head>` (`fusion.heads`: xgb, linear): the CNN members' pooled backbone
  features (every member of an ensemble, side by side) concatenated with the embedding members' vectors, into the
  heads of `kneeoa.models.probes`, fitted on train, chosen on val and kept exactly as the embedding arms are. The CNN
  features of train images are in-sample (the CNN was fitted on them); the head sees that, the val choice does not.

A member that did not run makes every fused arm a not-run record naming it. A name that is not an arm of the run, a
member without a table for a task, or members scored on different knees are named errors. Fitted models are kept
in RUN_DIR/fusion/<arm>/<task>.json (`kneeoa.runfolder.fusion`; the heads in the formats of
`kneeoa.runfolder.heads`), so `kneeoa explain` can re-run the fused arms on occluded crops.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kneeoa.config import Config
from kneeoa.errors import ConfigError, ManifestError
from kneeoa.models.probes import fit_arm
from kneeoa.models.stacking import Decoding, cross_fit, fit_stacker, patient_folds, stack_inputs
from kneeoa.registry import Registry
from kneeoa.runfolder.arms import read_arms, record_arm
from kneeoa.runfolder.checkpoints import checkpoint_arms
from kneeoa.runfolder.embeddings import manifest_matrix, read_embeddings
from kneeoa.runfolder.fusion import fusion_model_path, write_fusion_record
from kneeoa.runfolder.heads import keep_fits
from kneeoa.runfolder.manifest import load_knee, read_manifest
from kneeoa.runfolder.predictions import (
    list_predictions,
    make_prediction_table,
    prediction_path,
    prob_columns,
    read_predictions,
    write_predictions,
)
from kneeoa.tasks import available_tasks, get_task, learned_tasks

_log = logging.getLogger(__name__)

PREFIX = "fusion"
STACK_ARM = f"{PREFIX}_stack"
FEATURES_ARM = f"{PREFIX}_features_{{head}}"



@dataclass(frozen=True)
class Method:
    """A fusion method: `fit(run_dir, cfg, manifest, members, tasks)` writes its arms; `arms(cfg)` names them."""

    fit: Callable[[Path, Config, pd.DataFrame, list[str], list[str]], None]
    arms: Callable[[Config], list[str]]


METHODS: Registry[Method] = Registry("fusion method")

def members_of(run_dir: Path, cfg: Config) -> list[str]:
    """`fusion.arms`, checked against the arms of the run.

    Raises:
        ConfigError: fewer than two arms, a fused arm as a member, or a name that is not an arm of the run (with
            the arms it has and the nearest name).
    """
    arms = list(dict.fromkeys(cfg.fusion.arms))
    known = sorted(set(read_arms(run_dir)) | {p.stem.partition("__")[0] for p in list_predictions(run_dir)})
    candidates = [a for a in known if not a.startswith(f"{PREFIX}_")]
    if len(arms) < 2:
        raise ConfigError(f"fusion.arms names {len(arms)} arm(s) ({', '.join(arms) or 'none'}); fusion needs at least "
                          f"two. Arms of {run_dir}: {', '.join(candidates) or 'none'}. Set fusion.arms in the study "
                          "config (or in a file passed with -c).")
    for arm in arms:
        if arm.startswith(f"{PREFIX}_"):
            raise ConfigError(f"fusion.arms: {arm!r} is a fused arm; members must be arms that other stages made.")
        if arm not in known:
            near = difflib.get_close_matches(arm, candidates, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"fusion.arms: {arm!r} is not an arm of {run_dir} (arms: "
                              f"{', '.join(candidates) or 'none'}).{hint} Run the stage that makes it first.")
    return arms


def run(run_dir: Path, cfg: Config) -> None:
    """Fit every method of `fusion.methods` over `fusion.arms`, for every labelled task of the config."""
    run_dir = Path(run_dir)
    members = members_of(run_dir, cfg)
    manifest = read_manifest(run_dir)
    tasks = learned_tasks(available_tasks(manifest, cfg.tasks.names))
    records = read_arms(run_dir)
    absent = [a for a in members if records.get(a, {}).get("status") == "not_run"]
    for method in cfg.fusion.methods:
        if absent:
            reasons = "; ".join(f"{a}: {records[a]['reason']}" for a in absent)
            for arm in METHODS.get(method).arms(cfg):
                record_arm(run_dir, arm, status="not_run", reason=f"member arm(s) did not run ({reasons})")
            continue
        METHODS.get(method).fit(run_dir, cfg, manifest, members, tasks)


# --------------------------------------------------------------------------------------------------------- stack


def member_tables(run_dir: Path, members: list[str], task: str) -> dict[str, pd.DataFrame] | None:
    """Each member's val and test rows for `task`, indexed by image_id in one order; None when a member has no table.

    Raises:
        ManifestError: two members were not scored on the same val/test knees, or disagree on a label.
    """
    tables = {}
    for arm in members:
        path = prediction_path(run_dir, arm, task)
        if not path.exists():
            return None
        table = read_predictions(path)[2]
        tables[arm] = table[table["split"].isin(["val", "test"])].set_index("image_id").sort_index()
    first, ref = members[0], tables[members[0]]
    for arm in members[1:]:
        other = tables[arm]
        for a, b, x, y in ((first, arm, ref, other), (arm, first, other, ref)):
            lost = x.index.difference(y.index)
            if len(lost):
                raise ManifestError(
                    f"fusion.arms: {a} and {b} were not run on the same knees for task {task}: {len(lost)} val/test "
                    f"image(s) of predictions/{a}__{task} are not in predictions/{b}__{task} (e.g. {lost[0]!r}). "
                    "Re-run both arms on this run's manifest.")
        if (ref["y_true"].to_numpy() != other["y_true"].to_numpy()).any():
            raise ManifestError(f"fusion.arms: predictions/{first}__{task} and predictions/{arm}__{task} disagree on "
                                "y_true; both must be labelled from this run's manifest.")
    return tables


def _decoding(task: str, cfg: Config) -> Decoding:
    """The CNN arms' decoding for the task: cut-points for ordinal tasks under `cnn.klg_decode: cutpoints`."""
    cutpoints = get_task(task).kind == "ordinal" and cfg.cnn.klg_decode == "cutpoints"
    return Decoding(cutpoints, cfg.cnn.cutpoint_bootstrap, cfg.cnn.cutpoint_accuracy_weight, cfg.seed)


def stack(run_dir: Path, cfg: Config, manifest: pd.DataFrame, members: list[str], tasks: list[str]) -> None:
    """Arm `fusion_stack`: cross-fitted on val by patient, the all-val fit applied to test."""
    fc = cfg.fusion
    patient_of = pd.Series(manifest["patient_id"].to_numpy(), index=manifest["image_id"])
    chosen: dict[str, dict] = {}
    for task in tasks:
        tables = member_tables(run_dir, members, task)
        if tables is None:
            lacking = [a for a in members if not prediction_path(run_dir, a, task).exists()]
            chosen[task] = {"skipped": f"no prediction table for this task from {', '.join(lacking)}"}
            continue
        k = get_task(task).n_classes
        ref = tables[members[0]]
        X = stack_inputs([tables[a][prob_columns(k)].to_numpy() for a in members])
        y, split = ref["y_true"].to_numpy(), ref["split"].to_numpy()
        groups = ref.index.map(patient_of).to_numpy()
        val, test = split == "val", split == "test"
        decoding = _decoding(task, cfg)
        folds = patient_folds(y[val], groups[val], fc.folds, cfg.seed)
        val_probs, val_pred = cross_fit(X[val], y[val], groups[val], folds, k, c=fc.stack_c, decoding=decoding)
        final = fit_stacker(X[val], y[val], groups[val], k, c=fc.stack_c, decoding=decoding)
        ids = np.concatenate([ref.index[val], ref.index[test]])
        table = make_prediction_table(ids, ["val"] * int(val.sum()) + ["test"] * int(test.sum()),
                                      np.concatenate([y[val], y[test]]),
                                      np.vstack([val_probs, final.predict_proba(X[test])]),
                                      y_pred=np.concatenate([val_pred, final.predict(X[test])]))
        write_predictions(table, run_dir, STACK_ARM, task)
        write_fusion_record({"members": members, "inputs": "log class probabilities, members in this order",
                             "c": fc.stack_c, "stacker": final.to_dict(),
                             "val_folds": dict(zip(ref.index[val], folds.tolist(), strict=True))},
                            run_dir, STACK_ARM, task)
        chosen[task] = {"folds": fc.folds, "c": fc.stack_c, "decoding": final.decoding["method"],
                        "val_images": int(val.sum()), "test_images": int(test.sum())}
        _log.info("%s %s: %s", STACK_ARM, task, chosen[task])
    record_arm(run_dir, STACK_ARM, status="ran", weights=f"logistic stacker over {', '.join(members)}",
               details={"method": "stack", "members": members, "tasks": chosen})


# ------------------------------------------------------------------------------------------------------ features


def cnn_features(run_dir: Path, arm: str, manifest: pd.DataFrame, cfg: Config, batch: int = 256) -> np.ndarray:
    """(n_manifest_rows, D) pooled backbone features of a CNN arm, every member side by side, in manifest order."""
    from kneeoa.arms.predictors import FEATURE_SOURCES

    features = FEATURE_SOURCES["cnn"](run_dir, arm, cfg)
    rows = manifest.to_dict("records")
    parts = [features([load_knee(run_dir, r) for r in rows[lo:lo + batch]])
             for lo in tqdm(range(0, len(rows), batch), desc=f"{arm} features", leave=False)]
    return np.concatenate(parts).astype(np.float32)


def feature_sources(run_dir: Path, members: list[str]) -> list[tuple[str, str]]:
    """(kind, name) of each distinct feature source: ("cnn", arm) for a CNN member, ("encoder", name) for an
    embedding member (an encoder's arms share one source); members with neither are left out."""
    records, cnns = read_arms(run_dir), set(checkpoint_arms(run_dir))
    sources: list[tuple[str, str]] = []
    for arm in members:
        encoder = records.get(arm, {}).get("details", {}).get("encoder")
        source = ("cnn", arm) if arm in cnns else ("encoder", encoder) if encoder else None
        if source and source not in sources:
            sources.append(source)
    return sources


def features(run_dir: Path, cfg: Config, manifest: pd.DataFrame, members: list[str], tasks: list[str]) -> None:
    """Arms `fusion_features_<head>`: concatenated features into the boost heads, fitted on train, chosen on val."""
    sources = feature_sources(run_dir, members)
    if len(sources) < 2:
        for arm in METHODS.get("features").arms(cfg):
            record_arm(run_dir, arm, status="not_run",
                       reason=f"feature fusion needs features from two members (a CNN checkpoint or an embedding "
                              f"table); {', '.join(members)} give {len(sources)}: {sources}")
        return
    blocks = [cnn_features(run_dir, name, manifest, cfg) if kind == "cnn"
              else manifest_matrix(read_embeddings(run_dir, name)[0], manifest, name, run_dir)
              for kind, name in sources]
    X = np.hstack(blocks)
    described = [{"kind": kind, "name": name, "dim": int(b.shape[1])}
                 for (kind, name), b in zip(sources, blocks, strict=True)]
    for head in cfg.fusion.heads:
        arm = FEATURES_ARM.format(head=head)
        chosen = keep_fits(head, fit_arm(head, X, manifest, tasks, cfg), run_dir=run_dir, arm=arm,
                           keep=lambda task, arm=arm: fusion_model_path(run_dir, arm, task))
        record_arm(run_dir, arm, status="ran",
                   weights="features of " + " + ".join(f"{s['name']} ({s['dim']}-d)" for s in described),
                   details={"method": "features", "members": members, "sources": described, "head": head,
                            "dim": int(X.shape[1]), "tasks": chosen})


METHODS.add("stack", Method(stack, lambda cfg: [STACK_ARM]))
METHODS.add("features", Method(features, lambda cfg: [FEATURES_ARM.format(head=h) for h in cfg.fusion.heads]))


def outcome(run_dir: Path, cfg: Config) -> tuple[list[str], bool]:
    """What the stage made: one line per fused arm (its tables, or why it did not run), and whether any fused arm
    ran with at least one table (`kneeoa fusion` exits 1 otherwise)."""
    records, lines, made = read_arms(run_dir), [], False
    for method in cfg.fusion.methods:
        for arm in METHODS.get(method).arms(cfg):
            rec = records.get(arm, {})
            if rec.get("status") != "ran":
                lines.append(f"{arm}: not run ({rec.get('reason', 'no record')})")
                continue
            tables = [t for t in cfg.tasks.names if prediction_path(run_dir, arm, t).exists()]
            made |= bool(tables)
            lines.append(f"{arm}: ran ({', '.join(tables) or 'no task had labels and tables for every member'})")
    return lines, made
