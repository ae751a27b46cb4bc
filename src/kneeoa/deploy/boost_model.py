"""Packaging the foundation-model arms `<encoder>_xgb`: an encoder reference plus one XGBoost booster per task.

The boost stage keeps each fitted head at RUN_DIR/heads/<arm>/<task>.json (`XGBHead.save`); export copies those
files and checks each against the run's prediction table, so a package whose heads do not reproduce the run to 1e-5
(a head and a table from different boost runs) is never written.

The encoder itself is not copied (RAD-DINO is 340 MB and under its own licence): `weights/encoder.json` names its
hub id, revision, feature choice, precision and weights checksum, and where the run loaded it from. Loading checks
the checksum, so a package never runs on other weights than it was made with.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kneeoa.config import Config
from kneeoa.deploy.package import ModelKind, PackageError, task_entry
from kneeoa.errors import WeightsNotFoundError
from kneeoa.models.estimators import XGBHead
from kneeoa.runfolder.embeddings import embedding_matrix, read_embeddings
from kneeoa.runfolder.heads import head_path
from kneeoa.runfolder.predictions import prediction_path, prob_columns
from kneeoa.sources.manifest import read_manifest
from kneeoa.transforms.preprocess import orient

ENCODER_JSON = "encoder.json"
#: Largest |package - run| probability difference accepted at export.
TOLERANCE = 1e-5


def _owns(run_dir: Path, arm: str, record: dict[str, Any]) -> bool:
    """An encoder's XGBoost arm: its record names the encoder (feature-fusion XGBoost arms have members instead)."""
    details = record.get("details", {})
    return details.get("head") == "xgb" and "encoder" in details


def _check_reproduces(head: XGBHead, X: np.ndarray, manifest: pd.DataFrame, run_dir: Path, arm: str,
                      task: str) -> float:
    path = prediction_path(run_dir, arm, task)
    table = pd.read_parquet(path)
    rows = manifest.reset_index(drop=True).reset_index().set_index("image_id").loc[table["image_id"], "index"]
    probs = head.predict_proba(X[rows.to_numpy()])
    diff = float(np.abs(probs - table[prob_columns(probs.shape[1])].to_numpy()).max())
    if diff > TOLERANCE:
        raise PackageError(f"{head_path(run_dir, arm, task)} does not reproduce {path} (largest probability "
                           f"difference {diff:.2g} > {TOLERANCE}); the head, the table or the embeddings come from "
                           f"different runs. Re-run `kneeoa boost {run_dir}` and export again.")
    return diff


def _export(run_dir: Path, arm: str, cfg: Config, weights_dir: Path) -> dict[str, Any]:
    record = json.loads((run_dir / "arms" / f"{arm}.json").read_text())
    details = record["details"]
    encoder = details["encoder"]
    table, provenance = read_embeddings(run_dir, encoder)
    manifest = read_manifest(run_dir)
    X = embedding_matrix(table.set_index("image_id").loc[manifest["image_id"]].reset_index())
    tasks, diffs = {}, {}
    for task, chosen in details["tasks"].items():
        if "n_trees" not in chosen:  # the stage skipped this task (the record says why)
            continue
        saved = head_path(run_dir, arm, task)
        if not saved.exists():
            raise PackageError(f"{saved} is missing: the boost stage that made {arm} did not keep its fitted {task} "
                               f"head (runs before heads were saved). Re-run `kneeoa boost {run_dir}` and export "
                               "again.")
        copy = shutil.copyfile(saved, weights_dir / f"{task}.json")
        diffs[task] = _check_reproduces(XGBHead.load(copy), X, manifest, run_dir, arm, task)
        tasks[task] = {**task_entry(task, {"method": "argmax"}), "n_trees": int(chosen["n_trees"])}
    ref = {k: provenance[k] for k in ("encoder", "model_id", "revision", "checksum", "features", "dim", "precision",
                                      "weights_source", "weights_path", "preprocess")}
    (weights_dir / ENCODER_JSON).write_text(json.dumps(ref, indent=2) + "\n")
    # Stages read a manifest row flipped when it is `mirrored` (left knees, with data.mirror_left), so new left knees
    # are flipped the same way before they are embedded.
    mirror_left = bool(manifest["mirrored"].any()) if "mirrored" in manifest else False
    return {"tasks": tasks, "encoder": ref, "preprocess": {**ref["preprocess"], "mirror_left": mirror_left},
            "export_check": {"max_abs_prob_difference": diffs}}


class EmbedXgbModel:
    """A frozen encoder and one XGBoost head per task; crops are embedded as the embed stage did."""

    def __init__(self, encoder: Any, heads: dict[str, XGBHead], info: dict[str, Any]) -> None:
        self.encoder, self.heads, self.info = encoder, heads, info

    def features(self, crops: list[np.ndarray], sides: list[str]) -> np.ndarray:
        """The encoder's embeddings of the crops (left knees flipped as the run flipped them)."""
        mirror = self.info["preprocess"]["mirror_left"]
        return self.encoder.encode([orient(np.asarray(c, dtype=np.float32), s, mirror_left=mirror)
                                    for c, s in zip(crops, sides, strict=True)])

    def predict_proba(self, crops: list[np.ndarray], sides: list[str]) -> dict[str, np.ndarray]:
        X = self.features(crops, sides)
        return {t: head.predict_proba(X) for t, head in self.heads.items()}

    def decode(self, task: str, probs: np.ndarray) -> np.ndarray:
        return np.asarray(probs).argmax(axis=1)

    def cam(self, crop: np.ndarray, side: str, task: str, cls: int) -> None:
        return None  # gradients do not flow through boosted trees


def _head(path: Path, task: str) -> XGBHead:
    if not path.exists():
        raise PackageError(f"Model package lacks {path} (task '{task}' in model.json). Export the package again.")
    return XGBHead.load(path)


def _load(model_dir: Path, info: dict[str, Any], *, encoder_weights: Path | None = None) -> EmbedXgbModel:
    """The package's heads on its encoder, loaded from `encoder_weights` or else where the run loaded it from."""
    from kneeoa.models.encoders.foundation import create_encoder

    ref = info["encoder"]
    weights = encoder_weights or ref["weights_path"]
    try:
        enc = create_encoder(ref["encoder"], weights, features=ref["features"], precision=ref["precision"],
                             device="cpu")
    except WeightsNotFoundError as e:
        raise WeightsNotFoundError(f"Model package {model_dir} needs the {ref['model_id']} encoder (revision "
                                   f"{ref['revision']}), which is not at {weights}: {e}") from e
    if enc.checksum != ref["checksum"]:
        raise PackageError(f"The {ref['model_id']} weights at {enc.snapshot.path} have checksum {enc.checksum[:16]}; "
                           f"model package {model_dir} was made with {ref['checksum'][:16]}. Point it at the "
                           "snapshot the run used.")
    heads = {t: _head(model_dir / "weights" / f"{t}.json", t) for t in info["tasks"]}
    return EmbedXgbModel(enc, heads, info)


KIND = ModelKind("embed_xgb", _owns, _export, _load)
