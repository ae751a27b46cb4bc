"""Stage `zeroshot`: an image-text encoder without training (`zeroshot.encoder`, BiomedCLIP by default), (a) as
anatomy QC, (b) as a KL grader by prompts.

(a) Each image is scored against the label set `zeroshot.labels` with the model card's template
("this is a photo of {label}"); probabilities are softmax(logit_scale * cos(image, text)). An image is identified
as a knee when the knee label (`zeroshot.knee_label`) is its top label, the rule behind the paper's 91.14%. The
per-image result goes to the stage's own QC table, RUN_DIR/qc/zeroshot.parquet (`zs_knee_prob`, `zs_is_knee`,
`top_label`; the manifest is never rewritten); RUN_DIR/zeroshot_qc.json holds the share identified overall and by
the `low_quality` flag (the paper's failure analysis) and the worst misses (`kneeoa.runfolder.qc`). The prediction
table `<prefix>_zeroshot__knee_id` has y_true = 1 for every image and prob_1 = the knee label's probability.
(b) KL grade: the five `zeroshot.klg_prompts` (KL0..KL4, in order) under the same template, as
`<prefix>_zeroshot__klg`.

Which encoders can do this is their registry entry's `zero_shot` flag. Prompts are data (config); `prompts` and
`zero_shot_probs` turn them into a classifier as pure functions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kneeoa.config import Config, ZeroShotCfg
from kneeoa.errors import ConfigError, WeightsNotFoundError
from kneeoa.models.encoders.base import ClipEncoder
from kneeoa.models.encoders.foundation import create_encoder, weights_for, zero_shot_spec
from kneeoa.models.encoders.zero_shot import prompts, zero_shot_probs
from kneeoa.runfolder.arms import record_arm
from kneeoa.runfolder.embeddings import embedding_matrix, embeddings_path, read_embedding_info, read_embeddings
from kneeoa.runfolder.manifest import load_knee, read_manifest
from kneeoa.runfolder.predictions import make_prediction_table, write_predictions
from kneeoa.runfolder.qc import write_zeroshot_qc
from kneeoa.tasks import available_tasks, get_task

_log = logging.getLogger(__name__)

#: Embedding provenance that must match for the embed stage's vectors to stand in for a fresh pass.
_SAME_VECTORS = ("model_id", "checksum", "features", "precision", "preprocess")


def _check(zc: ZeroShotCfg) -> None:
    if zc.knee_label not in zc.labels:
        raise ConfigError(f"zeroshot.knee_label {zc.knee_label!r} is not in zeroshot.labels {zc.labels}; add it.")
    if len(zc.labels) < 2:
        raise ConfigError(f"zeroshot.labels needs the knee label and at least one other. Got {zc.labels}.")
    k = get_task("klg").n_classes
    if len(zc.klg_prompts) != k:
        raise ConfigError(f"zeroshot.klg_prompts needs one prompt per KL grade ({k}, KL0 first). "
                          f"Got {len(zc.klg_prompts)}.")


def _image_features(run_dir: Path, manifest: pd.DataFrame, enc: ClipEncoder, batch_size: int) -> np.ndarray:
    """Projected image embeddings: the embed stage's table when the same model made it, else a fresh pass."""
    made = read_embedding_info(run_dir, enc.spec.name)
    if made is not None and embeddings_path(run_dir, enc.spec.name).exists():
        ours = json.loads(json.dumps(enc.describe()))  # tuples -> lists, as read back from JSON
        if all(made.get(k) == ours[k] for k in _SAME_VECTORS if k != "features") and made["features"] == "projected":
            table = read_embeddings(run_dir, enc.spec.name)[0].set_index("image_id")
            if manifest["image_id"].isin(table.index).all():
                _log.info("Zero-shot reuses %s", embeddings_path(run_dir, enc.spec.name))
                return embedding_matrix(table.loc[manifest["image_id"]].reset_index())
    out = []
    for lo in tqdm(range(0, len(manifest), batch_size), desc="zeroshot", unit="batch"):
        rows = manifest.iloc[lo:lo + batch_size]
        out.append(enc.encode_projected([load_knee(run_dir, r) for r in rows.to_dict("records")]))
    return np.concatenate(out) if out else np.zeros((0, enc.dim), dtype=np.float32)


def _share(mask: pd.Series) -> dict[str, Any]:
    return {"n": int(len(mask)), "identified": int(mask.sum()),
            "share": float(mask.mean()) if len(mask) else float("nan")}


def qc_table(manifest: pd.DataFrame, probs: np.ndarray, zc: ZeroShotCfg) -> pd.DataFrame:
    """Per image: the knee label's probability, whether it is the top label, and the top label."""
    knee = zc.labels.index(zc.knee_label)
    return pd.DataFrame({"image_id": manifest["image_id"].to_numpy(), "zs_knee_prob": probs[:, knee],
                         "zs_is_knee": probs.argmax(axis=1) == knee,
                         "top_label": np.asarray(zc.labels)[probs.argmax(axis=1)]})


def _qc_summary(manifest: pd.DataFrame, qc: pd.DataFrame, zc: ZeroShotCfg, n_failures: int = 12) -> dict[str, Any]:
    manifest = manifest.merge(qc, on="image_id", validate="one_to_one")
    top = manifest["top_label"]
    is_knee = manifest["zs_is_knee"]
    misses = manifest[~is_knee].sort_values("zs_knee_prob").head(n_failures)
    return {
        "rule": "top-1 label over zeroshot.labels is the knee label",
        "template": zc.template, "labels": zc.labels, "knee_label": zc.knee_label,
        "overall": _share(is_knee),
        "share_knee_prob_over_half": float((manifest["zs_knee_prob"] > 0.5).mean()) if len(manifest) else None,
        "by_low_quality": {str(flag).lower(): _share(is_knee[manifest["low_quality"] == flag])
                           for flag in (False, True) if (manifest["low_quality"] == flag).any()},
        "top_label_counts": pd.Series(top).value_counts().to_dict(),
        "failures": misses[["image_id", "image_path", "top_label", "zs_knee_prob", "low_quality"]].to_dict("records"),
    }


def run(run_dir: Path, cfg: Config) -> None:
    """Anatomy QC and KL grading by prompts; without weights the arm is recorded as not run."""
    run_dir, zc, fc = Path(run_dir), cfg.zeroshot, cfg.foundation
    spec = zero_shot_spec(zc.encoder)
    arm = spec.zeroshot_arm
    if not zc.enabled:
        record_arm(run_dir, arm, status="not_run", reason="zeroshot.enabled is false in the config.")
        return
    _check(zc)
    try:
        enc = create_encoder(spec.name, weights_for(fc, spec.name), features="projected", precision=fc.precision,
                             device=fc.device)
    except WeightsNotFoundError as e:
        _log.warning("Skipping zero-shot: %s", e)
        record_arm(run_dir, arm, status="not_run", reason=str(e))
        return
    manifest = read_manifest(run_dir)
    img = _image_features(run_dir, manifest, enc, fc.batch_size)
    probs = zero_shot_probs(img, enc.encode_text(prompts(zc.labels, zc.template)), enc.logit_scale)
    qc = qc_table(manifest, probs, zc)
    summary = {"arm": arm, "encoder": spec.name, "model_id": enc.model_id, "revision": enc.revision,
               "checksum": enc.checksum, **_qc_summary(manifest, qc, zc)}
    write_zeroshot_qc(qc, summary, run_dir)
    knee = qc["zs_knee_prob"].to_numpy()
    write_predictions(make_prediction_table(manifest["image_id"], manifest["split"], np.ones(len(manifest)),
                                            np.stack([1 - knee, knee], axis=1)), run_dir, arm, "knee_id")
    tasks = ["knee_id"]
    if available_tasks(manifest, ["klg"]):
        graded = manifest["klg"].notna().to_numpy()
        klg_probs = zero_shot_probs(img[graded], enc.encode_text(prompts(zc.klg_prompts, zc.template)),
                                    enc.logit_scale)
        rows = manifest[graded]
        write_predictions(make_prediction_table(rows["image_id"], rows["split"], rows["klg"].to_numpy(dtype=int),
                                                klg_probs), run_dir, arm, "klg")
        tasks.append("klg")
    record_arm(run_dir, arm, status="ran",
               weights=f"{enc.model_id} revision {enc.revision} sha256 {enc.checksum[:12]}",
               details={"encoder": spec.name, "template": zc.template, "labels": zc.labels,
                        "knee_label": zc.knee_label, "klg_prompts": zc.klg_prompts, "tasks": tasks,
                        "share_identified_as_knee": summary["overall"]["share"]})
