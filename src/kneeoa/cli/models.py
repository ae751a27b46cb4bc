"""Command-line entry points for the foundation-model half: `kneeoa models list|fetch|verify`, `embed`, `boost`,
`zeroshot`. Commands parse options and delegate; the main CLI (`kneeoa.cli.app`) registers them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from kneeoa.cli.common import guard, run_config
from kneeoa.config import Config

models_app = typer.Typer(no_args_is_help=True, help="Foundation-model weights: what a study needs, fetch, verify.")
console = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Study YAML; default: RUN_DIR/config.yaml.")]
WeightsOpt = Annotated[Path | None, typer.Option("--weights", "-w", help="Snapshot folder in the hub layout.")]


def _config(run_dir: Path | None, config: Path | None) -> Config:
    from kneeoa.config_checks import load_config

    if config:
        return load_config(config)
    return run_config(run_dir) if run_dir else Config()


@models_app.command("list")
def models_list(weights_root: Annotated[Path | None, typer.Option(help="Folder with one snapshot per encoder.")] = None,
                config: ConfigOpt = None,
                run: Annotated[Path | None, typer.Option(help="Also list the encoders pretrained in this run folder "
                                                         "(RUN_DIR/encoders/, `kneeoa pretrain`).")] = None) -> None:
    """Show the built-in graders with their figures, and the weights a study needs (encoders, CNN backbones) and
    where each would load from now (no download)."""
    from kneeoa.deploy.builtin import builtin_table
    from kneeoa.models.encoders.foundation import features_for, get_encoder_spec, weights_for
    from kneeoa.models.hub import locate_snapshot

    graders = Table("built-in grader", "tasks", "val figures (patient-bootstrap 95% CI)", "knee check", "folder",
                    title="Graders shipped with kneeoa (`kneeoa predict --model NAME`)")
    for row in builtin_table():
        graders.add_row(*row)
    console.print(graders)

    cfg = _config(None, config).foundation
    if weights_root:
        cfg = dataclasses.replace(cfg, weights_root=str(weights_root))
    table = Table("encoder", "hub id", "features", "loads from")
    for name in cfg.encoders:
        spec = get_encoder_spec(name)
        snap, tried = locate_snapshot(spec.hub_id, spec.layout, weights_for(cfg, name))
        where = (f"{snap.source}: {snap.path} (revision {snap.revision})" if snap else
                 f"[red]not found[/] ({'; '.join(tried)}); fetch with `{spec.fetch_hint}`")
        features = features_for(cfg, name)
        table.add_row(spec.name, spec.hub_id, f"{features} ({spec.features[features]}-d)", where)
    console.print(table)
    from kneeoa.config import backbone_cfg
    from kneeoa.models.cnn.backbones import BACKBONES, resolve_pretrained

    cnn = _config(None, config).cnn
    backbones = Table("CNN backbone", "hub id", "starting weights")
    for name in cnn.backbones:
        hp = backbone_cfg(cnn, name)
        bb = BACKBONES.get(name)
        _, where = guard(resolve_pretrained, bb, hp.pretrained, hp.weights.get(name))
        backbones.add_row(name, bb.hub_id, where)
    console.print(backbones)
    if run is not None:
        from kneeoa.cli.common import fail
        from kneeoa.cli.pretrain import run_encoders_table
        from kneeoa.errors import ConfigError

        if not run.is_dir():
            fail(ConfigError(f"--run {run} is not a run folder (it does not exist). Give a folder made by `kneeoa "
                             "prepare` or `kneeoa run`."))

        console.print(run_encoders_table(run))


@models_app.command("fetch")
def models_fetch(names: Annotated[list[str] | None, typer.Argument(help="Encoders (default: all registered).")] = None,
                 dest: Annotated[Path, typer.Option(help="Folder to fill: DEST/<encoder>/ per encoder.")] = Path(
                     "weights")) -> None:
    """Download encoder snapshots into DEST/<encoder>/ (needs huggingface.co; run on a connected machine)."""
    from kneeoa.models.encoders.foundation import fetch_encoder, list_encoders

    for name in names or list_encoders():
        path = guard(fetch_encoder, name, dest / name)
        console.print(f"{name}: {path}")
    console.print(f"Use them with `--weights {dest}/<encoder>` or the config key foundation.weights_root: {dest}.")


def verify_encoder(name: str, weights: Path | None) -> list[str]:
    """Load every feature choice of an encoder from `weights` and compare the embedding size with the registry.

    Returns:
        One line per problem (empty when the snapshot is the published model).
    """
    from kneeoa.models.encoders.foundation import create_encoder, get_encoder_spec

    spec = get_encoder_spec(name)
    problems = []
    for features, expected in spec.features.items():
        enc = create_encoder(spec.name, weights, features=features, precision="fp32", device="cpu")
        out = enc.encode(np.random.default_rng(0).random((2, 64, 64), dtype=np.float32))
        if out.shape != (2, expected) or not np.isfinite(out).all():
            problems.append(f"{spec.name} {features}: embedding shape {out.shape}, expected (2, {expected}) "
                            f"(from {enc.snapshot.path}); these are not the published {spec.title} weights.")
        else:
            console.print(f"{spec.name} {features}: {expected}-d ok (revision {enc.revision}, "
                          f"sha256 {enc.checksum[:16]}, {enc.snapshot.source})")
    return problems


@models_app.command("verify")
def models_verify(name: Annotated[str, typer.Argument(help="A registered encoder (`kneeoa models list`).")],
                  weights: WeightsOpt = None) -> None:
    """Check that a snapshot has the files, loads offline and gives the published embedding sizes."""
    problems = guard(verify_encoder, name, weights)
    for line in problems:
        console.print(f"[bold red]error:[/] {line}")
    if problems:
        raise typer.Exit(1)


def embed_cmd(run_dir: Annotated[Path, typer.Argument(help="Run folder.")],
              encoder: Annotated[str | None, typer.Option(help="A registered encoder (default: all in config).")]
              = None, weights: WeightsOpt = None, config: ConfigOpt = None) -> None:
    """Embed every manifest image with frozen foundation encoders into RUN_DIR/embeddings/ (resumable)."""
    from kneeoa.stages import check_inputs, embed

    cfg = _config(run_dir, config)
    guard(check_inputs, "embed", run_dir)
    if encoder is None:
        if weights is not None:
            raise typer.BadParameter("--weights needs --encoder (which model the folder holds).")
        guard(embed.run, run_dir, cfg)
    else:
        guard(embed.embed_one, run_dir, encoder, weights, cfg)


def boost_cmd(run_dir: Annotated[Path, typer.Argument(help="Run folder.")],
              encoder: Annotated[str | None, typer.Option(help="Only this encoder's arms.")] = None,
              config: ConfigOpt = None) -> None:
    """Fit XGBoost and linear-probe heads on the embeddings; write their prediction tables."""
    from kneeoa.stages import boost, check_inputs

    cfg = _config(run_dir, config)
    guard(check_inputs, "boost", run_dir)
    if encoder is not None:
        cfg.foundation.encoders = [encoder]
    guard(boost.run, run_dir, cfg)
    from kneeoa.models.encoders.foundation import encoder_arms
    from kneeoa.runfolder.arms import read_arms

    records = read_arms(run_dir)
    arms = [a for name in cfg.foundation.encoders for a in encoder_arms(cfg.foundation, name)]
    for arm in arms:
        rec = records.get(arm, {})
        typer.echo(f"{arm}: {rec.get('status', 'no record')}" + (f" ({rec['reason']})" if rec.get("reason") else ""))
    if not any(records.get(a, {}).get("status") == "ran" for a in arms):
        raise typer.Exit(1)  # asked for boosted arms, fitted none

def zeroshot_cmd(run_dir: Annotated[Path, typer.Argument(help="Run folder.")], weights: WeightsOpt = None,
                 config: ConfigOpt = None) -> None:
    """Zero-shot with an image-text encoder (zeroshot.encoder): anatomy QC (is it a knee?) and KL grading by prompts."""
    from kneeoa.stages import check_inputs, zeroshot

    cfg = _config(run_dir, config)
    guard(check_inputs, "zeroshot", run_dir)
    if weights is not None:
        cfg.foundation.weights[cfg.zeroshot.encoder] = str(weights)
    guard(zeroshot.run, run_dir, cfg)
