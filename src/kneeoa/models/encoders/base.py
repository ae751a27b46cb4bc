"""Frozen encoders as objects: `Encoder.encode(images) -> (B, dim)`, and `ClipEncoder` with text for zero-shot.

Built by `kneeoa.models.encoders.foundation.create_encoder` from a registry entry and a snapshot; `describe()` is the
provenance written beside every embedding table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kneeoa.models.encoders.spec import EncoderSpec
from kneeoa.models.hub import Snapshot
from kneeoa.transforms.preprocess import Preprocess


class Encoder:
    """A frozen image encoder: `encode(images) -> (B, dim) float32`.

    Attributes:
        spec: the registry entry. model_id: hub id. revision: hub commit ("unknown" for an undated folder).
        checksum: SHA-256 of the weights file, so two folders of the same revision can still be told apart.
        features: which vector ("projected", "cls", ...). dim: its length. preprocess: the input pipeline.
        precision: "bf16" or "fp32". device: torch device string. snapshot: where the weights were found.
    """

    def __init__(self, *, spec: EncoderSpec, snapshot: Snapshot, model: torch.nn.Module,
                 forward: Callable[[torch.Tensor], torch.Tensor], preprocess: Preprocess, dim: int, features: str,
                 precision: str, device: str, checksum: str) -> None:
        self.spec, self.snapshot, self.model, self._forward = spec, snapshot, model.eval(), forward
        self.preprocess, self.dim, self.features = preprocess, dim, features
        self.precision, self.device, self.checksum = precision, device, checksum

    @property
    def model_id(self) -> str:
        return self.spec.hub_id

    @property
    def revision(self) -> str:
        return self.snapshot.revision

    def _autocast(self):
        return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def forward(self, x: torch.Tensor) -> np.ndarray:
        """The bare model pass on preprocessed input (B, 3, h, w) -> (B, dim) float32."""
        with torch.inference_mode(), self._autocast():
            return self._forward(x.to(self.device)).float().cpu().numpy()

    def forward_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """The same pass as `forward` with autograd on and no autocast: preprocessed (B, 3, h, w) -> (B, dim) float
        tensor on the encoder's device, for gradients through the encoder (Grad-CAM, `kneeoa.arms.encoder_cam`)."""
        with torch.enable_grad():
            return self._forward(x.to(self.device)).float()

    def encode(self, images: Any) -> np.ndarray:
        """Embed grayscale crops.

        Args:
            images: (B, H, W) or (B, 1, H, W) float array/tensor in [0, 1], or a list of (H, W) arrays.

        Returns:
            (B, dim) float32.
        """
        return self.forward(self.preprocess(images))

    def describe(self) -> dict[str, Any]:
        """Provenance written beside every embedding: what ran, from which weights, with which preprocessing."""
        return {"encoder": self.spec.name, "model_id": self.model_id, "revision": self.revision,
                "checksum": self.checksum, "weights_source": self.snapshot.source,
                "weights_path": str(self.snapshot.path), "features": self.features, "dim": self.dim,
                "precision": self.precision, "preprocess": self.preprocess.to_dict()}


class ClipEncoder(Encoder):
    """An image-text encoder (BiomedCLIP): adds `encode_text` and the learned `logit_scale` for zero-shot use."""

    def __init__(self, *, tokenizer: Callable[[list[str]], torch.Tensor], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tokenizer = tokenizer

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), D) float32 projected text embeddings (not normalised)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        with torch.inference_mode(), self._autocast():
            return self.model.encode_text(tokens).float().cpu().numpy()

    def encode_projected(self, images: Any) -> np.ndarray:
        """(B, D) projected image embeddings whatever `features` is: zero-shot needs the joint space."""
        with torch.inference_mode(), self._autocast():
            return self.model.encode_image(self.preprocess(images).to(self.device)).float().cpu().numpy()
