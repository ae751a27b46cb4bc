"""Packaging the supervised CNN arms: every member checkpoint as safetensors weights plus a JSON of the rest.

The run's checkpoint payloads (`kneeoa.models.cnn.infer.CnnPredictor.payloads`) are split into
`weights/member<i>.safetensors` (the state dict) and `weights/member<i>.json` (backbone, tasks, heads,
preprocessing, decoding, weights source), and rebuilt with `CnnPredictor.from_payloads`: the package runs the very
inference code the run's train stage ran, which is what makes `predict` equal the run's own prediction tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kneeoa.config import Config
from kneeoa.deploy.package import ModelKind, PackageError, task_entry
from kneeoa.runfolder.checkpoints import arm_dir

_MEMBER = "member{}"


def _jsonable(value: Any) -> Any:
    """Payload metadata as JSON values (tuples -> lists, numpy scalars and arrays -> Python)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _owns(run_dir: Path, arm: str, record: dict[str, Any]) -> bool:
    return arm_dir(run_dir, arm).is_dir()


def _export(run_dir: Path, arm: str, cfg: Config, weights_dir: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    from kneeoa.models.cnn.infer import CnnPredictor

    predictor = CnnPredictor.from_folder(arm_dir(run_dir, arm))
    members = []
    for i, member in enumerate(m for group in predictor.groups for m in group):
        name = _MEMBER.format(i)
        save_file({k: v.detach().cpu().contiguous() for k, v in member.payload["state_dict"].items()},
                  str(weights_dir / f"{name}.safetensors"))
        meta = _jsonable({**{k: v for k, v in member.payload.items() if k != "state_dict"},
                          "preprocess": member.pre.to_dict()})
        (weights_dir / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
        members.append(name)
    first = predictor.payloads[0]
    decoding = {t: _jsonable(first.get("decoding", {}).get(t, {"method": "argmax"})) for t in predictor.tasks}
    return {"tasks": {t: task_entry(t, decoding[t]) for t in predictor.tasks},
            "preprocess": predictor.preprocess.to_dict(), "backbone": first["backbone"],
            "heads": _jsonable(first.get("heads", {})), "members": members}


class CnnModel:
    """A packaged CNN arm (one model or an ensemble), ready for `predict` and `serve`."""

    def __init__(self, predictor: Any, info: dict[str, Any]) -> None:
        self.predictor, self.info = predictor, info
        self._cams: dict[str, Any] = {}

    def _oriented(self, crops: list[np.ndarray], sides: list[str]) -> list[np.ndarray]:
        orient = self.predictor.preprocess.orient
        return [orient(np.asarray(c, dtype=np.float32), s) for c, s in zip(crops, sides, strict=True)]

    def predict_proba(self, crops: list[np.ndarray], sides: list[str]) -> dict[str, np.ndarray]:
        return self.predictor.predict_proba(self._oriented(crops, sides))

    def features(self, crops: list[np.ndarray], sides: list[str]) -> np.ndarray:
        return self.predictor.features(self._oriented(crops, sides))

    def decode(self, task: str, probs: np.ndarray) -> np.ndarray:
        return np.asarray(self.predictor.decode(task, probs), dtype=int)

    def cam(self, crop: np.ndarray, side: str, task: str, cls: int) -> np.ndarray:
        """Grad-CAM of class `cls` over the crop, returned in the crop's own (radiographic) orientation."""
        from kneeoa.explain.cam import gradcam

        if task not in self._cams:
            self._cams[task] = self.predictor.cam_model(task)
        module, layer, preprocess = self._cams[task]
        oriented = self._oriented([crop], [side])[0]
        heat = gradcam(module, layer, preprocess(oriented)[None], [int(cls)])[0]
        # orient() mirrors a left knee into model orientation; mirroring the map again puts it back on the film.
        return self.predictor.preprocess.orient(heat, side)


def _load(model_dir: Path, info: dict[str, Any], **_options: Any) -> CnnModel:
    from safetensors.torch import load_file

    from kneeoa.models.cnn.infer import CnnPredictor

    payloads = []
    for name in info["members"]:
        meta_path, weights_path = (model_dir / "weights" / f"{name}{ext}" for ext in (".json", ".safetensors"))
        missing = [str(p) for p in (meta_path, weights_path) if not p.exists()]
        if missing:
            raise PackageError(f"Model package {model_dir} lacks {', '.join(missing)} (listed in model.json "
                               "'members'). Export the package again.")
        try:
            payloads.append({**json.loads(meta_path.read_text()), "state_dict": load_file(str(weights_path))})
        except Exception as e:  # safetensors raises SafetensorError, json ValueError, on damaged files
            raise PackageError(f"Model package {model_dir}: {weights_path.name} or {meta_path.name} cannot be read "
                               f"({type(e).__name__}: {e}); the file is damaged or truncated. Export the package "
                               "again.") from e
    return CnnModel(CnnPredictor.from_payloads(payloads, str(model_dir / "weights")), info)


KIND = ModelKind("cnn", _owns, _export, _load)
