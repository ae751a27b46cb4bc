"""CNN inference in one place: the run's prediction tables and every later use of a trained arm go through here.

A `CnnPredictor` holds one or more *groups* (one multi-task model, or one model per task), each of one or more
*members* (several seeds for an ensemble arm). Probabilities are the members' mean, each member optionally averaged
over test-time views (`kneeoa.transforms.augment.tta_views`). Inputs are float crops in [0, 1] in the model's
orientation (`orient`), quantised exactly as the training cache quantises them, so predicting a crop again gives the
run's numbers to float precision.

Checkpoint files (`RUN_DIR/checkpoints/<arm>/<group>.pt`) hold one member payload, or {"members": [payloads]} for an
ensemble. A payload: backbone, tasks {task: K}, heads {task: head}, state_dict, preprocess {image_size, in_chans,
mean, std, mirror_left, tta}, decoding {task: {"method": "argmax"} | {"method": "cutpoints", "cuts": [...]}},
weights_source, extra.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kneeoa.errors import ConfigError, WeightsNotFoundError
from kneeoa.models.cnn.backbones import BACKBONES, MultiTaskNet, TaskView, net_from_payload, preprocess_fn
from kneeoa.models.cnn.heads import decode
from kneeoa.runfolder.checkpoints import CHECKPOINTS_DIR
from kneeoa.transforms.augment import normalise, tta_views
from kneeoa.transforms.cache import to_uint8


def _batches(images: np.ndarray, pre: dict[str, Any], batch_size: int, progress: bool = False):
    """Normalised float batches (B, 1, S, S) of uint8 images."""
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(images), batch_size), desc="predicting", disable=not progress, leave=False):
        yield normalise(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).unsqueeze(1),
                        pre["mean"], pre["std"])


def _formatted(x: torch.Tensor, pre: dict[str, Any]) -> torch.Tensor:
    """`x` in the memory format the checkpoint's backbone was trained in."""
    if "backbone" in pre and BACKBONES.get(pre["backbone"]).channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def member_probs(net: MultiTaskNet, images: np.ndarray, pre: dict[str, Any], *, batch_size: int = 64,
                 progress: bool = False) -> dict[str, np.ndarray]:
    """Class probabilities per task for uint8 images (n, S, S) through one network (mean over TTA views if set).

    `pre` is the checkpoint's preprocessing, plus its `backbone` name (for the memory format it was trained in).
    """
    net.eval()
    out: dict[str, list[np.ndarray]] = {}
    for x in _batches(images, pre, batch_size, progress):
        views = tta_views(x) if pre.get("tta") else [x]
        acc: dict[str, torch.Tensor] = {}
        for v in views:
            for t, p in net.probs(net(_formatted(v, pre))).items():
                acc[t] = acc.get(t, 0) + p.double()
        for t, p in acc.items():
            out.setdefault(t, []).append((p / len(views)).numpy())
    return {t: np.concatenate(v) for t, v in out.items()}


class CnnPredictor:
    """A trained CNN arm ready to grade crops: its groups of member networks, preprocessing and decoding."""

    def __init__(self, groups: list[list[tuple[MultiTaskNet, dict[str, Any]]]]) -> None:
        if not groups or not all(groups):
            raise WeightsNotFoundError("A CNN predictor needs at least one trained network.")
        self.groups = groups
        first = groups[0][0][1]["preprocess"]
        self.preprocess = dict(first)

    @classmethod
    def from_payloads(cls, payloads: list[dict[str, Any]]) -> CnnPredictor:
        """Members grouped by the tasks they cover (same tasks = same group, an ensemble)."""
        groups: dict[tuple[str, ...], list] = {}
        for p in payloads:
            groups.setdefault(tuple(p["tasks"]), []).append((net_from_payload(p), p))
        return cls(list(groups.values()))

    @classmethod
    def from_run(cls, run_dir: Path, arm: str) -> CnnPredictor:
        """Every checkpoint of `arm` under RUN_DIR/checkpoints/<arm>/."""
        folder = Path(run_dir) / CHECKPOINTS_DIR / arm
        files = sorted(folder.glob("*.pt"))
        if not files:
            raise WeightsNotFoundError(f"No checkpoint for arm '{arm}' under {folder}. Train it first "
                                       "(`kneeoa train RUN_DIR`).")
        return cls.from_payloads([m for f in files for m in read_members(f)])

    @property
    def payloads(self) -> list[dict[str, Any]]:
        return [p for group in self.groups for _, p in group]

    @property
    def tasks(self) -> list[str]:
        return [t for group in self.groups for t in group[0][1]["tasks"]]

    def _group_of(self, task: str) -> list[tuple[MultiTaskNet, dict[str, Any]]]:
        for group in self.groups:
            if task in group[0][1]["tasks"]:
                return group
        raise KeyError(f"This model does not predict task '{task}'; it predicts {', '.join(self.tasks)}.")

    def orient(self, img: np.ndarray, side: str) -> np.ndarray:
        """Mirror a left knee when the model was trained on mirrored data."""
        if self.preprocess.get("mirror_left") and side == "L":
            return np.ascontiguousarray(np.asarray(img)[:, ::-1])
        return np.asarray(img)

    def predict_uint8(self, images: np.ndarray, *, batch_size: int = 64, progress: bool = False
                      ) -> dict[str, np.ndarray]:
        """Probabilities per task for already-quantised images (n, S, S) uint8 (the training cache's format)."""
        out: dict[str, np.ndarray] = {}
        for group in self.groups:
            parts = [member_probs(net, images, {**p["preprocess"], "backbone": p["backbone"]},
                                  batch_size=batch_size, progress=progress) for net, p in group]
            for t in parts[0]:
                out[t] = np.mean([part[t] for part in parts], axis=0)
        return out

    def predict_proba(self, images: list[np.ndarray], *, batch_size: int = 64) -> dict[str, np.ndarray]:
        """Probabilities per task for float crops in [0, 1], already oriented (`orient`)."""
        return self.predict_uint8(self._quantised(images), batch_size=batch_size)

    def _quantised(self, images: list[np.ndarray]) -> np.ndarray:
        """(n, S, S) uint8 model inputs of float crops, quantised exactly as the training cache quantises them."""
        size = self.preprocess["image_size"]
        return np.stack([to_uint8(img, size) for img in images]) if len(images) else np.zeros((0, size, size),
                                                                                               np.uint8)

    @torch.no_grad()
    def features(self, images: list[np.ndarray], *, batch_size: int = 64, every_member: bool = False) -> np.ndarray:
        """(n, D) pooled backbone features of the first member for float crops in [0, 1], already oriented; with
        `every_member`, each member of the first group side by side, (n, D x members).

        The first member's are what the knee check (`kneeoa.models.knee_check`) scores: the features the grader
        itself reads. Every member's are what feature fusion (`kneeoa fusion`) concatenates with an embedding.
        """
        stack = self._quantised(images)
        blocks = []
        for net, payload in self.groups[0] if every_member else self.groups[0][:1]:
            pre = {**payload["preprocess"], "backbone": payload["backbone"]}
            net.eval()
            parts = [net.backbone(_formatted(x, pre)).double().numpy() for x in _batches(stack, pre, batch_size)]
            blocks.append(np.concatenate(parts) if parts else np.zeros((0, net.backbone.num_features)))
        return np.hstack(blocks)

    def decoding(self, task: str) -> dict[str, Any]:
        return self._group_of(task)[0][1].get("decoding", {}).get(task, {"method": "argmax"})

    def decode(self, task: str, probs: np.ndarray) -> np.ndarray:
        """Predicted classes under the arm's stored decoding (argmax, or the val-tuned cut-points)."""
        return decode(probs, self.decoding(task))

    def cam_model(self, task: str, cam_layer: str = "last"
                  ) -> tuple[nn.Module, nn.Module, Callable[[np.ndarray], torch.Tensor]]:
        """(model (B,1,H,W) -> (B,K) class scores, Grad-CAM target layer, preprocess) of the first member."""
        net, payload = self._group_of(task)[0]
        layer = BACKBONES.get(payload["backbone"]).cam_layers[cam_layer](net.backbone)
        return TaskView(net, task).eval(), layer, preprocess_fn(payload["preprocess"])


def read_members(path: Path) -> list[dict[str, Any]]:
    """The member payloads of one checkpoint file (one, or several for an ensemble)."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    return list(payload["members"]) if "members" in payload else [payload]


def load_classifier(run_dir: Path, arm: str, task: str, *, cam_layer: str = "last"
                    ) -> tuple[nn.Module, nn.Module, Callable[[np.ndarray], torch.Tensor]]:
    """A trained arm's classifier for one task: (model (B,1,H,W)->(B,K) scores, Grad-CAM target layer, preprocess).

    `cam_layer` names an entry of the backbone's `cam_layers` ("last" or "penultimate"). For an ensemble arm the
    first member is explained.
    """
    predictor = CnnPredictor.from_run(run_dir, arm)
    if task not in predictor.tasks:
        raise WeightsNotFoundError(f"No checkpoint for arm '{arm}' and task '{task}' under "
                                   f"{Path(run_dir) / CHECKPOINTS_DIR / arm}. Train it first.")
    layers = BACKBONES.get(predictor.payloads[0]["backbone"]).cam_layers
    if cam_layer not in layers:
        raise ConfigError(f"explain.cam_layer must be one of {', '.join(layers)}. Got {cam_layer!r}.")
    return predictor.cam_model(task, cam_layer)
