"""Grad-CAM through a foundation encoder, for the linear-probe arms (`<prefix>_linear`).

Boosted trees are not differentiable, so the `<prefix>_xgb` arms get occlusion maps; a linear probe is: encoder ->
(x - mean) / scale -> W x + b is one differentiable classifier through the encoder's real architecture (BiomedCLIP's
timm ViT inside open_clip, RAD-DINO's transformers Dinov2, kneeoa's two-branch CNN). `encoder_arm_classifier`
rebuilds it from a run folder: the arm record, the embeddings' provenance, the probe `boost` kept
(`kneeoa.runfolder.heads`) and the encoder's weights. Where to hook and how to read a token grid is the encoder
library's `CamHook` (`kneeoa.models.encoders.loaders.LOADERS`), so a new library is one entry there.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from kneeoa.arms.predictors import run_encoder
from kneeoa.errors import ConfigError, MissingInputError
from kneeoa.explain.cam import vit_reshape_transform
from kneeoa.models.encoders.base import Encoder
from kneeoa.models.encoders.foundation import get_encoder_spec
from kneeoa.models.encoders.loaders import LOADERS
from kneeoa.runfolder.arms import ARMS_DIR, read_arms
from kneeoa.runfolder.heads import LinearProbe, head_path, read_linear_probe

if TYPE_CHECKING:
    from kneeoa.config import Config


class ProbeClassifier(torch.nn.Module):
    """A frozen encoder and its linear probe as one classifier: preprocessed (B, 3, h, w) -> (B, K) logits.

    The logits are `LinearProbe.logits` of the encoder's features (softmax gives the arm's probabilities; classes
    absent from training are -inf). The encoder runs in fp32 with autograd on; its weights stay frozen, so the input
    is made to require gradients and carries the graph to the hooked layer.
    """

    def __init__(self, encoder: Encoder, probe: LinearProbe) -> None:
        super().__init__()
        self.encoder = encoder
        self.model = encoder.model  # a submodule, so `eval()` and Grad-CAM's hooks reach the encoder's layers
        weight, bias = probe.affine()
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float32, device=encoder.device))
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32, device=encoder.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(self.encoder.device).requires_grad_(True)
        return F.linear(self.encoder.forward_with_grad(x), self.weight, self.bias)


class EncoderCam(NamedTuple):
    """What `kneeoa.explain.cam.gradcam` needs to explain one encoder arm and task.

    Attributes:
        model: (B, 3, h, w) float -> (B, K) logits (`ProbeClassifier`).
        target_layer: the hooked module inside the encoder's own architecture.
        preprocess: one (H, W) float crop in [0, 1] -> (3, h, w) model input (the encoder's `Preprocess`).
        reshape_transform: tokens (B, N, D) -> (B, D, h/p, w/p) for ViTs; None for CNN encoders.
    """

    model: ProbeClassifier
    target_layer: torch.nn.Module
    preprocess: Callable[[np.ndarray], torch.Tensor]
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None


def probe_arms(run_dir: Path) -> list[str]:
    """The arms Grad-CAM can explain through their encoder: encoder arms that ran with a linear-probe head (not the
    feature-fusion arms, whose linear head reads several sources; occlusion maps explain those)."""
    return [arm for arm, rec in read_arms(run_dir).items() if rec["status"] == "ran"
            and rec.get("details", {}).get("head") == "linear" and "encoder" in rec.get("details", {})]


def _token_grid(encoder: Encoder, patch: tuple[int, int]) -> tuple[int, int]:
    """The patch grid of the model input: the preprocessing's crop over the patch size."""
    return encoder.preprocess.crop[0] // patch[0], encoder.preprocess.crop[1] // patch[1]


def encoder_arm_classifier(run_dir: Path, arm: str, task: str, cfg: Config) -> EncoderCam:
    """The differentiable classifier of a linear-probe arm for one task, with its Grad-CAM layer and preprocessing.

    How the explain stage uses it (the same contract as the CNN arms' `_cams`)::

        model, layer, preprocess, reshape = encoder_arm_classifier(run_dir, arm, task, cfg)
        x = torch.stack([preprocess(load_knee(run_dir, row)) for row in rows])  # mirrored rows come flipped
        maps = cam.gradcam(model, layer, x, classes, reshape_transform=reshape)  # (B, h, w) in [0, 1]
        # maps are in the orientation the encoder saw: flip mirrored rows back (m[:, ::-1]) to overlay the file

    `preprocess` takes one crop as `load_knee` returns it (the orientation `embed` embedded), so the logits are the
    arm's own scores for that image. The maps cover the model input (h, w): the encoder's resize and centre crop of
    the crop, i.e. the whole crop when it is square; `kneeoa.explain.cam.resize_map` brings them to a mask's size.
    `classes` index the task's classes (K columns; softmax of the logits is the arm's prediction table row).

    Args:
        run_dir: the run folder; reads arms/<arm>.json, embeddings/<encoder>.json and heads/<arm>/<task>.json.
        arm: a `<prefix>_linear` arm that ran (`probe_arms(run_dir)` lists them).
        task: a task the arm has a kept probe for.
        cfg: the run's config: `foundation.weights` / `weights_root` say where the encoder's weights are,
            `foundation.device` where it runs (always in fp32).

    Raises:
        MissingInputError: no record of the arm, or no embeddings provenance (names the command that makes it).
        ConfigError: the arm did not run, has a head gradients do not flow through (XGBoost), or its encoder's
            library has no `CamHook`.
        WeightsNotFoundError: the probe file is missing (`kneeoa boost` keeps it), or the encoder's weights are
            missing or not those that made the embeddings.
    """
    run_dir = Path(run_dir)
    record = read_arms(run_dir).get(arm)
    if record is None:
        raise MissingInputError(f"{run_dir / ARMS_DIR / f'{arm}.json'} does not exist: arm '{arm}' was not made in "
                                f"this run. Make the embedding arms with `kneeoa embed {run_dir}` then "
                                f"`kneeoa boost {run_dir}`.")
    details = record.get("details", {})
    if record["status"] != "ran":
        raise ConfigError(f"Arm '{arm}' did not run ({record['reason']}), so it has no classifier to explain.")
    if details.get("head") != "linear":
        raise ConfigError(f"Arm '{arm}' has a {details.get('head')!r} head, which gradients do not flow through; "
                          f"Grad-CAM through an encoder explains the linear-probe arms "
                          f"({', '.join(probe_arms(run_dir)) or 'none in this run'}). Its maps are occlusion maps.")
    probe = read_linear_probe(head_path(run_dir, arm, task))
    spec = get_encoder_spec(details["encoder"])
    hook = LOADERS.get(spec.library).cam
    if hook is None:
        raise ConfigError(f"Encoder library '{spec.library}' (encoder '{spec.name}') says nowhere to hook Grad-CAM. "
                          "Give its Library entry in kneeoa.models.encoders.loaders a `cam=CamHook(...)`.")
    encoder = run_encoder(run_dir, spec.name, cfg, precision="fp32")
    reshape = (partial(vit_reshape_transform, grid=_token_grid(encoder, hook.patch(encoder)))
               if hook.patch is not None else None)
    return EncoderCam(ProbeClassifier(encoder, probe), hook.layer(encoder), encoder.preprocess.one,
                      reshape)
