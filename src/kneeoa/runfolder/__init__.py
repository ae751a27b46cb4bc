"""The run folder: every file a stage reads or writes, with its owner, path, schema and reader/writer.

Stages talk only through these files. Each file has one owning stage (the only one that writes it); merged views
such as `metrics.csv` are derived from the owners' parts, so no stage can erase another's numbers. Stages and the
report import this package (`kneeoa.runfolder.<file kind>`), never another stage.

`RUN_FILES` lists every file; `kneeoa.stages.STAGES` declares, per stage, which of them it needs, may read and
writes; `require` checks a stage's inputs before it writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kneeoa.errors import MissingInputError
from kneeoa.registry import Registry


@dataclass(frozen=True)
class RunFile:
    """One kind of file (or folder of files) in a run folder.

    Attributes:
        name: registry key (`manifest`, `predictions`, ...).
        pattern: path relative to the run folder; a glob for families of files (`predictions/*__*.parquet`).
        owners: the stages that write it (several only where each writes its own files, e.g. one arm's tables).
        what: one line for the docs and for error messages.
        derived: True for views rebuilt from other files (never written by a stage directly).
    """

    name: str
    pattern: str
    owners: tuple[str, ...]
    what: str
    derived: bool = False

    def paths(self, run_dir: Path) -> list[Path]:
        """The files of this kind present in `run_dir`, sorted."""
        run_dir = Path(run_dir)
        if any(c in self.pattern for c in "*?["):
            return sorted(p for p in run_dir.glob(self.pattern) if p.is_file())
        path = run_dir / self.pattern
        return [path] if path.is_file() else []

    def exists(self, run_dir: Path) -> bool:
        return bool(self.paths(run_dir))

    def hint(self, run_dir: Path) -> str:
        """The command(s) that make this file (for a derived view: the first stage that writes a part of it)."""
        makers = self.owners[:1] if self.derived else self.owners
        return " or ".join(f"`{_COMMANDS.get(o, f'kneeoa {o} {{run}}').format(run=run_dir)}`" for o in makers)


#: How to invoke the stages whose command differs from `kneeoa <stage> RUN_DIR`.
_COMMANDS = {"prepare": "kneeoa prepare <source> ... --out {run} (or kneeoa phantom --out {run}, kneeoa demo)",
             "run": "kneeoa run CONFIG --out {run}"}

RUN_FILES: Registry[RunFile] = Registry("run-folder file")


for _file in (
    RunFile("config", "config.yaml", ("prepare", "run"), "resolved config, every default written out"),
    RunFile("manifest", "manifest.parquet", ("prepare",), "one validated row per knee image"),
    RunFile("data_report", "data_report.json", ("prepare",), "counts, quarantine, unmatched, label missingness"),
    RunFile("quarantine", "quarantine.parquet", ("prepare",), "items the importer could not use, with reasons"),
    RunFile("skipped", "skipped.parquet", ("prepare",), "source files not used, with reasons"),
    RunFile("crops", "crops/*", ("prepare",), "knee crops (16-bit PNG)"),
    RunFile("masks", "masks/*.npz", ("prepare",), "phantom feature masks"),
    RunFile("localize_overview", "figures/localize/*", ("prepare",), "films with their knee crops drawn (OAI)"),
    RunFile("prepare_journal", ".prepare/films/*", ("prepare",),
            "outcomes of the films an unfinished prepare has done, for resuming; removed when prepare completes"),
    RunFile("image_cache", "cache/*", ("train", "pretrain"), "decoded uint8 images at the training size"),
    RunFile("encoders", "encoders/*/*", ("pretrain",), "self-supervised encoders: weights, config, model card"),
    RunFile("pretrain_state", "pretrain/*", ("pretrain",), "resume state of an unfinished pretraining run"),
    RunFile("checkpoints", "checkpoints/*/*.pt", ("train",), "CNN weights + preprocessing + heads + decoding"),
    RunFile("train_logs", "logs/**/*", ("train",), "Lightning CSV logs"),
    RunFile("lightning", "checkpoints/*/lightning/**/*", ("train",), "Lightning's best-epoch checkpoints"),
    RunFile("embeddings", "embeddings/*.parquet", ("embed",), "image_id -> vector, one table per encoder"),
    RunFile("embeddings_info", "embeddings/*.json", ("embed",), "provenance of each embedding table"),
    RunFile("heads", "heads/*/*.json", ("boost",),
            "fitted heads of the embed+boost arms: XGBoost boosters, linear probes"),
    RunFile("fusion_models", "fusion/*/*.json", ("fusion",),
            "fitted fusion models: the stacker's coefficients and cross-fitting folds, feature-fusion heads"),
    RunFile("predictions", "predictions/*__*.parquet", ("train", "boost", "fusion", "zeroshot"),
            "one prediction table per arm x task"),
    RunFile("arms", "arms/*.json", ("train", "embed", "boost", "fusion", "zeroshot"),
            "per arm: ran / not_run, weights, reason"),
    RunFile("zeroshot_qc", "qc/zeroshot.parquet", ("zeroshot",), "zero-shot anatomy QC per image"),
    RunFile("zeroshot_summary", "zeroshot_qc.json", ("zeroshot",), "zero-shot QC shares and worst misses"),
    RunFile("metrics_evaluate", "metrics/evaluate.csv", ("evaluate",), "point metrics per arm x task x split"),
    RunFile("metrics_stats", "metrics/stats.csv", ("stats",), "bootstrap CIs of the point metrics, ECE, Brier"),
    RunFile("metrics_explain", "metrics/explain.csv", ("explain",), "CAM-in-mask scores (phantom)"),
    RunFile("metrics", "metrics.csv", ("evaluate", "stats", "explain"),
            "all metrics with CIs, merged from metrics/<stage>.csv", derived=True),
    RunFile("metrics_json", "metrics.json", ("evaluate",), "point metrics nested, with confusion matrices"),
    RunFile("comparisons", "comparisons.csv", ("stats",), "paired arm comparisons, Holm-adjusted"),
    RunFile("reliability", "reliability.csv", ("stats",), "reliability-diagram bins"),
    RunFile("roc_bands", "roc_bands.csv", ("stats",), "ROC curves with patient-bootstrap bands"),
    RunFile("gradcam", "figures/gradcam/*", ("explain",), "Grad-CAM montages and their index.json"),
    RunFile("occlusion", "figures/occlusion/*", ("explain",), "occlusion-map montages of every arm and their index"),
    RunFile("report", "report.html", ("report",), "the self-contained HTML report"),
):
    RUN_FILES.add(_file.name, _file)


def run_file(name: str) -> RunFile:
    return RUN_FILES.get(name)


def require(run_dir: Path, names: tuple[str, ...] | list[str], *, stage: str) -> None:
    """Refuse to run `stage` unless every file kind in `names` is present; writes nothing.

    Raises:
        MissingInputError: naming the run folder, each missing file and the command that makes it.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingInputError(f"Run folder {run_dir} does not exist, so `kneeoa {stage}` has nothing to read. Check "
                                "the path, or make a run with `kneeoa demo`, `kneeoa phantom` or `kneeoa prepare`.")
    missing = [RUN_FILES.get(n) for n in names if not RUN_FILES.get(n).exists(run_dir)]
    if missing:
        lines = "; ".join(f"{run_dir / f.pattern} ({f.what}): make it with {f.hint(run_dir)}" for f in missing)
        raise MissingInputError(f"`kneeoa {stage}` needs files that {run_dir} does not have: {lines}. Nothing was "
                                "written.")
