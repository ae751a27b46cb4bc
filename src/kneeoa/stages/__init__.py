"""Stages: functions of a run folder and the config, `run(run_dir: Path, cfg: Config) -> None`.

Each stage reads its inputs from files in the run folder and writes its outputs there (atomically), so any stage can
be re-run or inspected alone. A registry entry (`StageSpec`) names the function as "module:function" (imported
lazily, so the CLI starts fast and a stage's heavy dependencies load only when it runs) and declares the run-folder
files (`kneeoa.runfolder.RUN_FILES`) the stage needs, may read and writes. `get_stage` returns the function wrapped
so that a missing input stops it, with the command that makes the input, before it writes anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kneeoa.registry import Registry, resolve
from kneeoa.runfolder import RUN_FILES, require


@dataclass(frozen=True)
class StageSpec:
    """One stage, as data.

    Attributes:
        target: "module:function" of `run(run_dir, cfg)`.
        needs: run-folder files (RUN_FILES names) that must exist before it runs.
        reads: files it uses when present (resume state, optional inputs, the parts a merged view is built from).
        writes: the files it writes; a stage writes nothing else.
    """

    target: str
    needs: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in (*self.needs, *self.reads, *self.writes):
            RUN_FILES.get(name)  # an unknown file name fails at registration, with the valid ones

    def load(self) -> Callable[[Path, object], None]:
        return resolve(self.target)


STAGES: Registry[StageSpec] = Registry("stage")
_METRIC_PARTS = ("metrics_evaluate", "metrics_stats", "metrics_explain")
STAGES.add("prepare", StageSpec("kneeoa.stages.prepare:run",
                                writes=("config", "manifest", "data_report", "quarantine", "skipped", "crops", "masks",
                                        "localize_overview", "prepare_journal")))
STAGES.add("train", StageSpec("kneeoa.stages.train:run", needs=("manifest",),
                              reads=("crops", "image_cache", "checkpoints", "lightning"),
                              writes=("image_cache", "checkpoints", "lightning", "train_logs", "predictions", "arms")))
STAGES.add("pretrain", StageSpec("kneeoa.stages.pretrain:run", needs=("manifest",),
                                 reads=("crops", "image_cache", "pretrain_state"),
                                 writes=("image_cache", "pretrain_state", "encoders")))
STAGES.add("embed", StageSpec("kneeoa.stages.embed:run", needs=("manifest",),
                              reads=("crops", "embeddings", "embeddings_info"),
                              writes=("embeddings", "embeddings_info", "arms")))
STAGES.add("boost", StageSpec("kneeoa.stages.boost:run", needs=("manifest",),
                              reads=("embeddings", "embeddings_info", "arms"), writes=("heads", "predictions", "arms")))
STAGES.add("fusion", StageSpec("kneeoa.stages.fusion:run", needs=("manifest", "predictions", "arms"),
                               reads=("crops", "checkpoints", "embeddings", "embeddings_info"),
                               writes=("fusion_models", "predictions", "arms")))
STAGES.add("zeroshot", StageSpec("kneeoa.stages.zeroshot:run", needs=("manifest",),
                                 reads=("crops", "embeddings", "embeddings_info"),
                                 writes=("zeroshot_qc", "zeroshot_summary", "predictions", "arms")))
STAGES.add("evaluate", StageSpec("kneeoa.stages.evaluate:run", needs=("predictions",), reads=_METRIC_PARTS,
                                 writes=("metrics_evaluate", "metrics", "metrics_json")))
STAGES.add("stats", StageSpec("kneeoa.stages.stats:run", needs=("manifest", "predictions"), reads=_METRIC_PARTS,
                              writes=("metrics_stats", "metrics", "comparisons", "reliability", "roc_bands")))
STAGES.add("explain", StageSpec("kneeoa.stages.explain:run", needs=("manifest", "predictions"),
                                reads=("crops", "masks", "checkpoints", "heads", "arms", "embeddings_info", "encoders",
                                       "fusion_models", *_METRIC_PARTS),
                                writes=("gradcam", "occlusion", "metrics_explain", "metrics")))
STAGES.add("report", StageSpec("kneeoa.report.html:run", needs=("manifest", "metrics"),
                               reads=("crops", "data_report", "localize_overview", "arms", "predictions",
                                      *_METRIC_PARTS, "metrics_json", "comparisons", "reliability", "roc_bands",
                                      "gradcam", "zeroshot_qc", "zeroshot_summary", "embeddings_info", "occlusion",
                                      "fusion_models"),
                               writes=("report",)))


def check_inputs(name: str, run_dir: Path) -> None:
    """Refuse stage `name` unless its `needs` are in `run_dir` (MissingInputError naming each and its command)."""
    require(run_dir, STAGES.get(name).needs, stage=name)


def check_plan(names: list[str], run_dir: Path) -> None:
    """Refuse a sequence of stages (a study) when one of them needs a file that is neither in `run_dir` nor written by
    an earlier stage of the sequence; checked before anything runs or is written."""
    made: set[str] = set()
    for name in names:
        spec = STAGES.get(name)
        pending = tuple(f for f in spec.needs if f not in made)
        if pending:
            require(run_dir, pending, stage=name)
        made.update(spec.writes)


def get_stage(name: str) -> Callable[[Path, object], None]:
    """The stage's function, checking its inputs before it runs (an unknown name fails with the valid ones)."""
    spec = STAGES.get(name)

    def run(run_dir: Path, cfg) -> None:
        check_inputs(name, run_dir)
        spec.load()(run_dir, cfg)

    run.__name__ = run.__qualname__ = f"run_{name}"
    return run
