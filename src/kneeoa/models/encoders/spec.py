"""An encoder's registry entry as data (`EncoderSpec`): what the encoder objects, the library loaders and the
registry (`kneeoa.models.encoders.foundation.ENCODERS`) all read.

It sits below them all, so the registry can build an encoder from the loaders and the loaders can type the entry
they are given, without either importing the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kneeoa.models.hub import Layout


@dataclass(frozen=True)
class EncoderSpec:
    """One registered encoder, as data.

    Attributes:
        name: registry name (`biomedclip`, `rad-dino`). title: display name. hub_id: Hugging Face repository.
        library: the LOADERS entry that builds it. arm_prefix: prefix of its arms (`raddino_xgb`).
        features: feature choice -> embedding size of the published model; the first is the default.
        layout: files a snapshot must hold. weight_files: checkpoint names, in order of preference.
        preprocess_file: the snapshot file the preprocessing is read from.
        licence, paper: provenance for the report.
        zero_shot: True for an image-text model (a `ClipEncoder`) that can classify by text prompts.
        family: the kind of pretraining it stands for in the report's comparison of pretraining ("chest-radiograph
            FM"); empty: its title.
    """

    name: str
    title: str
    hub_id: str
    library: str
    arm_prefix: str
    features: dict[str, int]
    layout: Layout
    weight_files: tuple[str, ...]
    preprocess_file: str
    licence: str
    paper: str
    zero_shot: bool = False
    notes: dict[str, str] = field(default_factory=dict)
    run_folder: str | None = None  # weights made in the run folder (RUN_DIR/<run_folder>), used when none is given
    family: str = ""

    @property
    def default_features(self) -> str:
        return next(iter(self.features))

    @property
    def fetch_hint(self) -> str:
        return f"kneeoa models fetch {self.name} --dest DIR"

    @property
    def zeroshot_arm(self) -> str:
        """The arm of its zero-shot predictions (`biomedclip_zeroshot`)."""
        return f"{self.arm_prefix}_zeroshot"
