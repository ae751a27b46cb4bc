"""Every kind of arm as one function, crops in, class probabilities out: what model-agnostic explanations re-run.

`PREDICTORS` maps a kind of arm to a loader `(run_dir, arm, task, cfg) -> predict`, where `predict` takes float
crops (H, W) in [0, 1] and returns (n, K) probabilities of `task` (`kneeoa.explain.occlusion.Predict`). Crops come as
every stage reads them (`kneeoa.runfolder.manifest.load_knee`: mirrored rows flipped), the orientation each arm was
trained or embedded in; the caller flips its maps back to the files' orientation. A loader raises `OtherArmKind` when
the arm is not of its kind, so `arm_predictor` asks each entry in turn and the first that takes the arm wins; an arm no
entry takes raises `NoArmPredictor` with every entry's reason. A loader that takes the arm but lacks a file raises
`WeightsNotFoundError` (or `MissingInputError` for a missing provenance).

Entries are "module:function" strings, imported when used; a new kind of arm is one entry.
- `cnn`: arms with checkpoints (RUN_DIR/checkpoints/<arm>/): a `CnnPredictor` of every member that predicts the
  task (an ensemble's mean);
- `boost`: arms whose record (RUN_DIR/arms/<arm>.json) names an encoder and a head: the encoder that made
  RUN_DIR/embeddings/<encoder>.parquet, re-created with the features its provenance records, then the head `boost`
  kept (RUN_DIR/heads/<arm>/<task>.json: XGBoost or the linear probe, `kneeoa.runfolder.heads.load_head`);
- `fusion_stack`: the members re-run through their own entries, then the stacker fitted on all of val;
- `fusion_features`: the sources' features side by side (`FEATURE_SOURCES`: a CNN's pooled features, an encoder's
  vectors), then the kept head;
- `zeroshot`: an image-text encoder against the prompts the arm record holds (`ZERO_SHOT_TASKS`: knee_id, klg).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kneeoa.config import Config
from kneeoa.errors import KneeoaError, MissingInputError, WeightsNotFoundError
from kneeoa.explain.occlusion import Predict
from kneeoa.models.encoders.base import Encoder
from kneeoa.registry import Registry
from kneeoa.runfolder.arms import read_arms
from kneeoa.runfolder.checkpoints import arm_dir
from kneeoa.runfolder.embeddings import info_path, read_embedding_info
from kneeoa.runfolder.fusion import fusion_model_path
from kneeoa.runfolder.heads import head_path, load_head


class OtherArmKind(KneeoaError):
    """The arm is not of the loader's kind (the message says what the loader looks for)."""


class NoArmPredictor(KneeoaError):
    """No kind of arm in `PREDICTORS` takes the arm (the message gives each kind's reason)."""


PREDICTORS: Registry[Callable[[Path, str, str, Config], Predict]] = Registry("arm predictor")
PREDICTORS.add("cnn", "kneeoa.arms.predictors:cnn_predictor")
PREDICTORS.add("boost", "kneeoa.arms.predictors:head_predictor")
PREDICTORS.add("fusion_stack", "kneeoa.arms.predictors:stack_predictor")
PREDICTORS.add("fusion_features", "kneeoa.arms.predictors:features_predictor")
PREDICTORS.add("zeroshot", "kneeoa.arms.predictors:zeroshot_predictor")


def arm_predictor(run_dir: Path, arm: str, task: str, cfg: Config) -> Predict:
    """The predict function of `arm` for `task`, from the first entry of `PREDICTORS` that takes the arm.

    Raises:
        NoArmPredictor: no entry takes the arm (each entry's reason is in the message).
        WeightsNotFoundError: an entry takes the arm but a file it needs is missing (names the file and the fix).
    """
    reasons = []
    for kind in PREDICTORS:
        try:
            return PREDICTORS.get(kind)(Path(run_dir), arm, task, cfg)
        except OtherArmKind as e:
            reasons.append(f"{kind}: {e}")
    raise NoArmPredictor(f"Arm '{arm}' cannot be re-run on new crops; no kind of arm takes it ({'; '.join(reasons)}).")


def cnn_predictor(run_dir: Path, arm: str, task: str, cfg: Config) -> Predict:
    """A CNN arm: the mean of its members' probabilities, crops quantised as the training cache quantised them.

    Only the networks that predict `task` run (one model per task: that task's model).
    """
    from kneeoa.models.cnn.infer import CnnPredictor

    folder = arm_dir(run_dir, arm)
    if not any(folder.glob("*.pt")):
        raise OtherArmKind(f"no checkpoint under {folder}")
    whole = CnnPredictor.from_folder(folder)
    if task not in whole.tasks:
        raise WeightsNotFoundError(f"No checkpoint of arm '{arm}' under {folder} predicts task '{task}' (it predicts "
                                   f"{', '.join(whole.tasks)}). Train it again (`kneeoa train {run_dir}`).")
    predictor = CnnPredictor.from_payloads([p for p in whole.payloads if task in p["tasks"]])

    def predict(crops) -> np.ndarray:
        return predictor.predict_proba(list(crops), batch_size=max(1, len(crops)))[task]

    return predict


def run_encoder(run_dir: Path, encoder: str, cfg: Config, *, precision: str | None = None) -> Encoder:
    """The encoder that made the run's embeddings of `encoder`, with the feature choice its provenance records.

    Weights are found as the embed stage finds them (`kneeoa.models.encoders.foundation.weights_for`); the device comes
    from `cfg.foundation`, the precision from `precision` or else `cfg.foundation` (gradients want "fp32").

    Raises:
        MissingInputError: the provenance record is missing (names the command that makes it).
        WeightsNotFoundError: no weights are found, or the weights found are not the ones that made the embeddings
            (another checksum); names the folder the run used.
    """
    from kneeoa.models.encoders.foundation import create_encoder, get_encoder_spec, weights_for

    spec = get_encoder_spec(encoder)
    info = read_embedding_info(run_dir, spec.name)
    if info is None:
        raise MissingInputError(f"{info_path(run_dir, spec.name)} does not exist, so which {spec.title} features the "
                                f"heads were fitted on is unknown. Make it with `kneeoa embed {run_dir} --encoder "
                                f"{spec.name}`.")
    recorded = f"{info['model_id']} revision {info['revision']}, loaded from {info['weights_path']}"
    fix = f"Set foundation.weights.{spec.name} to the folder the run used ({info['weights_path']})."
    fc = cfg.foundation
    try:
        enc = create_encoder(spec.name, weights_for(fc, spec.name, run_dir), features=info["features"],
                             precision=precision or fc.precision, device=fc.device)
    except WeightsNotFoundError as e:
        raise WeightsNotFoundError(f"Re-running the {spec.title} arms needs the weights their embeddings came from "
                                   f"({recorded}). {fix} {e}") from e
    if info.get("checksum") and enc.checksum != info["checksum"]:
        raise WeightsNotFoundError(
            f"The {spec.title} weights at {enc.snapshot.path} (sha256 {enc.checksum[:12]}) are not those that made "
            f"{info_path(run_dir, spec.name)} (sha256 {info['checksum'][:12]}, {recorded}), so the run's heads do "
            f"not fit them. {fix}")
    return enc


def head_predictor(run_dir: Path, arm: str, task: str, cfg: Config) -> Predict:
    """An encoder + head arm (`<prefix>_xgb`, `<prefix>_linear`): each crop is embedded again by the run's encoder,
    then the head `boost` kept is applied."""
    details = read_arms(run_dir).get(arm, {}).get("details", {})
    if "encoder" not in details or "head" not in details:
        raise OtherArmKind("its arm record names no encoder and head")
    head = load_head(details["head"], head_path(run_dir, arm, task))
    encoder = run_encoder(run_dir, details["encoder"], cfg)

    def predict(crops) -> np.ndarray:
        return head.predict_proba(encoder.encode(list(crops)))

    return predict


def cnn_features(run_dir: Path, arm: str, cfg: Config) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """Crops -> a CNN arm's pooled backbone features, every member side by side (what feature fusion reads)."""
    from kneeoa.models.cnn.infer import CnnPredictor

    predictor = CnnPredictor.from_folder(arm_dir(run_dir, arm))
    return lambda crops: predictor.features(list(crops), every_member=True)


def encoder_features(run_dir: Path, encoder: str, cfg: Config) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """Crops -> the vectors of the encoder that made the run's embeddings."""
    enc = run_encoder(run_dir, encoder, cfg)
    return lambda crops: enc.encode(list(crops))


#: Where a feature-fusion arm's features come from, by the source kind its record names.
FEATURE_SOURCES: dict[str, Callable[[Path, str, Config], Callable[[Sequence[np.ndarray]], np.ndarray]]] = {
    "cnn": cnn_features, "encoder": encoder_features}


def _fusion_record(run_dir: Path, arm: str, task: str, method: str) -> tuple[dict[str, Any], Path]:
    details = read_arms(run_dir).get(arm, {}).get("details", {})
    if details.get("method") != method:
        raise OtherArmKind(f"its arm record names no fusion method {method!r}")
    path = fusion_model_path(run_dir, arm, task)
    if not path.exists():
        raise WeightsNotFoundError(f"{path} is missing: the fitted {task} model of arm '{arm}' was not kept. Run "
                                   f"`kneeoa fusion {run_dir}` again.")
    return details, path


def stack_predictor(run_dir: Path, arm: str, task: str, cfg: Config) -> Predict:
    """The stacker arm: each member re-run on the crops (its own entry here), then the stacker fitted on all of val."""
    from kneeoa.models.stacking import Stacker, stack_inputs

    _, path = _fusion_record(run_dir, arm, task, "stack")
    record = json.loads(path.read_text())
    stacker = Stacker.from_dict(record["stacker"])
    members = [arm_predictor(run_dir, member, task, cfg) for member in record["members"]]

    def predict(crops) -> np.ndarray:
        return stacker.predict_proba(stack_inputs([member(crops) for member in members]))

    return predict


def features_predictor(run_dir: Path, arm: str, task: str, cfg: Config) -> Predict:
    """A feature-fusion arm: every source's features of the crops side by side, then its kept head."""
    details, path = _fusion_record(run_dir, arm, task, "features")
    head = load_head(details["head"], path)
    sources = [FEATURE_SOURCES[s["kind"]](run_dir, s["name"], cfg) for s in details["sources"]]

    def predict(crops) -> np.ndarray:
        return head.predict_proba(np.hstack([source(crops) for source in sources]))

    return predict


def _zero_shot_knee(details: dict[str, Any]) -> tuple[list[str], Callable[[np.ndarray], np.ndarray]]:
    """Task knee_id: the anatomy labels' prompts; (not knee, knee) from the knee label's probability."""
    knee = details["labels"].index(details["knee_label"])
    return details["labels"], lambda p: np.stack([1 - p[:, knee], p[:, knee]], axis=1)


def _zero_shot_klg(details: dict[str, Any]) -> tuple[list[str], Callable[[np.ndarray], np.ndarray]]:
    """Task klg: one prompt per KL grade, KL0 first; the probabilities as they are."""
    return details["klg_prompts"], lambda p: p


#: The tasks a zero-shot arm grades, each: record details -> (labels to prompt, prompt probabilities -> task's).
ZERO_SHOT_TASKS: dict[str, Callable[[dict[str, Any]], tuple[list[str], Callable[[np.ndarray], np.ndarray]]]] = {
    "knee_id": _zero_shot_knee, "klg": _zero_shot_klg}


def zeroshot_predictor(run_dir: Path, arm: str, task: str, cfg: Config) -> Predict:
    """A zero-shot arm: the image-text encoder's projected embedding of each crop against the arm's own prompts
    (recorded in its arm record), exactly as the zeroshot stage graded the run."""
    from kneeoa.models.encoders.foundation import create_encoder, weights_for, zero_shot_spec
    from kneeoa.models.encoders.zero_shot import prompts, zero_shot_probs

    record = read_arms(run_dir).get(arm, {})
    details = record.get("details", {})
    if "template" not in details or "encoder" not in details:
        raise OtherArmKind("its arm record holds no zero-shot prompts")
    if task not in ZERO_SHOT_TASKS:
        raise WeightsNotFoundError(f"Zero-shot arm '{arm}' grades {', '.join(ZERO_SHOT_TASKS)} by prompts; it has "
                                   f"none for task '{task}'.")
    spec = zero_shot_spec(details["encoder"])
    enc = create_encoder(spec.name, weights_for(cfg.foundation, spec.name, run_dir), features="projected",
                         precision=cfg.foundation.precision, device=cfg.foundation.device)
    if f"sha256 {enc.checksum[:12]}" not in record.get("weights", ""):
        raise WeightsNotFoundError(f"The {spec.title} weights at {enc.snapshot.path} (sha256 {enc.checksum[:12]}) "
                                   f"are not those that graded arm '{arm}' ({record.get('weights')}). Point "
                                   f"foundation.weights.{spec.name} at the snapshot the run used.")
    labels, to_task = ZERO_SHOT_TASKS[task](details)
    text = enc.encode_text(prompts(labels, details["template"]))

    def predict(crops) -> np.ndarray:
        return to_task(zero_shot_probs(enc.encode_projected(list(crops)), text, enc.logit_scale))

    return predict
