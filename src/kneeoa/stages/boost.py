"""Stage `boost`: classifiers on frozen embeddings, one per encoder x task (the paper's foundation-model arms).

Two heads per encoder (fitted by `kneeoa.models.probes`, which the feature-fusion arms share):
- `<prefix>_xgb`: XGBoost (`kneeoa.models.estimators.XGBHead`), class-weighted, `multi:softprob` for KLG. For every
  combination of `foundation.xgb_grid` a model is fit on train and early-stopped on val (at most
  `xgb_n_estimators` trees, patience `xgb_early_stopping`); the combination with the lowest class-weighted val
  log-loss is kept. The paper does not report its search, so this small grid is our choice.
- `<prefix>_linear`: a linear probe, standardised features + class-weighted logistic regression, C chosen from
  `foundation.linear_c_grid` by the same val log-loss.
Test images are only predicted, never used for a choice. Predictions are written for every split; the arm record
holds the weights' model id, revision and checksum and the chosen hyperparameters per task. Every fitted head is kept
at RUN_DIR/heads/<arm>/<task>.json (`kneeoa.runfolder.heads`): the XGBoost ones for `kneeoa export`, the linear
probes for Grad-CAM through the encoder (`kneeoa.arms.encoder_cam`).
"""

from __future__ import annotations

from pathlib import Path

from kneeoa.config import Config
from kneeoa.errors import ManifestError
from kneeoa.models.encoders.foundation import encoder_arms, get_encoder_spec
from kneeoa.models.probes import fit_arm
from kneeoa.runfolder.arms import read_arms, record_arm
from kneeoa.runfolder.embeddings import manifest_matrix, read_embeddings
from kneeoa.runfolder.heads import head_path, keep_fits
from kneeoa.runfolder.manifest import read_manifest
from kneeoa.tasks import available_tasks, learned_tasks

#: Tasks that are not learned from labels (zero-shot anatomy QC has y_true = 1 everywhere).


def run(run_dir: Path, cfg: Config) -> None:
    """Fit the heads of every encoder in `cfg.foundation.encoders` on its embeddings, for every available task.

    An encoder without embeddings keeps the not-run record `embed` gave its arms (or gets one naming the command).
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    tasks = learned_tasks(available_tasks(manifest, cfg.tasks.names))
    for name in cfg.foundation.encoders:
        spec = get_encoder_spec(name)
        arms = encoder_arms(cfg.foundation, spec.name)
        try:
            table, info = read_embeddings(run_dir, spec.name)
        except ManifestError as e:
            recorded = read_arms(run_dir)
            for arm in arms:
                if recorded.get(arm, {}).get("status") != "not_run":
                    record_arm(run_dir, arm, status="not_run", reason=f"No {spec.title} embeddings: {e}")
            continue
        X = manifest_matrix(table, manifest, spec.name, run_dir)
        weights = f"{info['model_id']} revision {info['revision']} sha256 {info['checksum'][:12]}"
        for arm in arms:
            head = arm.removeprefix(f"{spec.arm_prefix}_")
            chosen = keep_fits(head, fit_arm(head, X, manifest, tasks, cfg), run_dir=run_dir, arm=arm,
                               keep=lambda task, arm=arm: head_path(run_dir, arm, task))
            record_arm(run_dir, arm, status="ran", weights=weights,
                       details={"encoder": spec.name, "features": info["features"], "dim": info["dim"],
                                "head": head, "tasks": chosen})
