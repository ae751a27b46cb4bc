"""CNN inference in one place: the run's prediction tables and every later use of a trained arm go through here.

A `CnnPredictor` holds one or more *groups* (one multi-task model, or one model per task), each of one or more
*members* (several seeds for an ensemble arm). Probabilities are the members' mean, each member optionally averaged
over test-time views (`kneeoa.transforms.augment.tta_views`). Inputs are float crops in [0, 1] in the model's
orientation (`CnnPredictor.preprocess.orient`), quantised exactly as the training cache quantises them and normalised
as each member was trained (the `kneeoa.transforms.preprocess.Preprocess` its payload stores), so predicting a crop
again gives the run's numbers to float precision.

An arm's checkpoints are the `<group>.pt` files of one folder named for the arm (where a run keeps that folder is
`kneeoa.runfolder.checkpoints`'s business; callers pass the folder in). A file holds one member payload, or
{"members": [payloads]} for an ensemble. A payload: backbone, tasks {task: K}, heads {task: head}, state_dict,
preprocess (`Preprocess.to_dict`: {image_size, in_chans, mean, std, mirror_left, tta}), decoding {task:
{"method": "argmax"} | {"method": "cutpoints", "cuts": [...]}}, weights_source, extra.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from kneeoa.errors import ConfigError, WeightsNotFoundError
from kneeoa.models.cnn.backbones import BACKBONES, MultiTaskNet, TaskView, net_from_payload
from kneeoa.models.cnn.heads import decode
from kneeoa.transforms.augment import tta_views
from kneeoa.transforms.preprocess import Preprocess


def _batches(images: np.ndarray, pre: Preprocess, batch_size: int, progress: bool = False):
    """Normalised float batches (B, 1, S, S) of uint8 images."""
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(images), batch_size), desc="predicting", disable=not progress, leave=False):
        yield pre.from_uint8(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).unsqueeze(1))


def _formatted(x: torch.Tensor, backbone: str) -> torch.Tensor:
    """`x` in the memory format `backbone` was trained in."""
    if BACKBONES.get(backbone).channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x


class Member(NamedTuple):
    """One trained network of an arm: the network, its checkpoint payload and the `Preprocess` the payload stores."""

    net: MultiTaskNet
    payload: dict[str, Any]
    pre: Preprocess


@torch.no_grad()
def member_probs(member: Member, images: np.ndarray, *, batch_size: int = 64, progress: bool = False
                 ) -> dict[str, np.ndarray]:
    """Class probabilities per task for uint8 images (n, S, S) through one network (mean over TTA views if set)."""
    net, backbone, pre = member.net, member.payload["backbone"], member.pre
    net.eval()
    out: dict[str, list[np.ndarray]] = {}
    for x in _batches(images, pre, batch_size, progress):
        views = tta_views(x) if pre.tta else [x]
        acc: dict[str, torch.Tensor] = {}
        for v in views:
            for t, p in net.probs(net(_formatted(v, backbone))).items():
                acc[t] = acc.get(t, 0) + p.double()
        for t, p in acc.items():
            out.setdefault(t, []).append((p / len(views)).numpy())
    return {t: np.concatenate(v) for t, v in out.items()}


class CnnPredictor:
    """A trained CNN arm ready to grade crops: its groups of member networks, preprocessing and decoding.

    `preprocess` is the first member's `Preprocess`: it orients and quantises the crops every member reads; each
    member normalises them with its own (`Member.pre`).
    """

    def __init__(self, groups: list[list[tuple[MultiTaskNet, dict[str, Any]]]], origin: str = "checkpoint") -> None:
        """`groups` of (network, payload) pairs; each payload's preprocessing is read here (`origin` names where the
        payloads came from in its errors)."""
        if not groups or not all(groups):
            raise WeightsNotFoundError("A CNN predictor needs at least one trained network.")
        self.groups = [[Member(net, p, Preprocess.from_dict(p["preprocess"], origin)) for net, p in group]
                       for group in groups]
        self.preprocess = self.groups[0][0].pre

    @classmethod
    def from_payloads(cls, payloads: list[dict[str, Any]], origin: str = "checkpoint") -> CnnPredictor:
        """Members grouped by the tasks they cover (same tasks = same group, an ensemble)."""
        groups: dict[tuple[str, ...], list] = {}
        for p in payloads:
            groups.setdefault(tuple(p["tasks"]), []).append((net_from_payload(p, origin), p))
        return cls(list(groups.values()), origin)

    @classmethod
    def from_folder(cls, folder: Path) -> CnnPredictor:
        """Every checkpoint (`*.pt`) of an arm's checkpoint folder, which is named for the arm.

        Raises:
            WeightsNotFoundError: the folder holds no checkpoint (names the arm, the folder and `kneeoa train`).
        """
        folder = Path(folder)
        files = sorted(folder.glob("*.pt"))
        if not files:
            raise WeightsNotFoundError(f"No checkpoint for arm '{folder.name}' under {folder}. Train it first "
                                       "(`kneeoa train RUN_DIR`).")
        return cls.from_payloads([m for f in files for m in read_members(f)], str(folder))

    @property
    def payloads(self) -> list[dict[str, Any]]:
        return [m.payload for group in self.groups for m in group]

    @property
    def tasks(self) -> list[str]:
        return [t for group in self.groups for t in group[0].payload["tasks"]]

    def _group_of(self, task: str) -> list[Member]:
        for group in self.groups:
            if task in group[0].payload["tasks"]:
                return group
        raise KeyError(f"This model does not predict task '{task}'; it predicts {', '.join(self.tasks)}.")

    def predict_uint8(self, images: np.ndarray, *, batch_size: int = 64, progress: bool = False
                      ) -> dict[str, np.ndarray]:
        """Probabilities per task for already-quantised images (n, S, S) uint8 (the training cache's format)."""
        out: dict[str, np.ndarray] = {}
        for group in self.groups:
            parts = [member_probs(m, images, batch_size=batch_size, progress=progress) for m in group]
            for t in parts[0]:
                out[t] = np.mean([part[t] for part in parts], axis=0)
        return out

    def predict_proba(self, images: list[np.ndarray], *, batch_size: int = 64) -> dict[str, np.ndarray]:
        """Probabilities per task for float crops in [0, 1], already oriented (`self.preprocess.orient`)."""
        return self.predict_uint8(self.preprocess.quantise(images), batch_size=batch_size)

    @torch.no_grad()
    def features(self, images: list[np.ndarray], *, batch_size: int = 64, every_member: bool = False) -> np.ndarray:
        """(n, D) pooled backbone features of the first member for float crops in [0, 1], already oriented; with
        `every_member`, each member of the first group side by side, (n, D x members).

        The first member's are what the knee check (`kneeoa.models.knee_check`) scores: the features the grader
        itself reads. Every member's are what feature fusion (`kneeoa fusion`) concatenates with an embedding.
        """
        stack = self.preprocess.quantise(images)
        blocks = []
        for net, payload, pre in self.groups[0] if every_member else self.groups[0][:1]:
            net.eval()
            parts = [net.backbone(_formatted(x, payload["backbone"])).double().numpy()
                     for x in _batches(stack, pre, batch_size)]
            blocks.append(np.concatenate(parts) if parts else np.zeros((0, net.backbone.num_features)))
        return np.hstack(blocks)

    def decoding(self, task: str) -> dict[str, Any]:
        return self._group_of(task)[0].payload.get("decoding", {}).get(task, {"method": "argmax"})

    def decode(self, task: str, probs: np.ndarray) -> np.ndarray:
        """Predicted classes under the arm's stored decoding (argmax, or the val-tuned cut-points)."""
        return decode(probs, self.decoding(task))

    def cam_model(self, task: str, cam_layer: str = "last"
                  ) -> tuple[nn.Module, nn.Module, Callable[[np.ndarray], torch.Tensor]]:
        """(model (B,1,H,W) -> (B,K) class scores, Grad-CAM target layer, preprocess) of the first member; preprocess
        takes one oriented float crop to its (1, S, S) input (`Preprocess.one`)."""
        net, payload, pre = self._group_of(task)[0]
        layer = BACKBONES.get(payload["backbone"]).cam_layers[cam_layer](net.backbone)
        return TaskView(net, task).eval(), layer, pre.one


def read_members(path: Path) -> list[dict[str, Any]]:
    """The member payloads of one checkpoint file (one, or several for an ensemble)."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    return list(payload["members"]) if "members" in payload else [payload]


def load_classifier(folder: Path, task: str, *, cam_layer: str = "last"
                    ) -> tuple[nn.Module, nn.Module, Callable[[np.ndarray], torch.Tensor]]:
    """A trained arm's classifier for one task: (model (B,1,H,W)->(B,K) scores, Grad-CAM target layer, preprocess).

    `folder` is the arm's checkpoint folder (`CnnPredictor.from_folder`). `cam_layer` names an entry of the
    backbone's `cam_layers` ("last" or "penultimate"). For an ensemble arm the first member is explained.
    """
    folder = Path(folder)
    predictor = CnnPredictor.from_folder(folder)
    if task not in predictor.tasks:
        raise WeightsNotFoundError(f"No checkpoint for arm '{folder.name}' and task '{task}' under {folder}. Train it "
                                   "first.")
    layers = BACKBONES.get(predictor.payloads[0]["backbone"]).cam_layers
    if cam_layer not in layers:
        raise ConfigError(f"explain.cam_layer must be one of {', '.join(layers)}. Got {cam_layer!r}.")
    return predictor.cam_model(task, cam_layer)
