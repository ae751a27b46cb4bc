"""`kneeoa pretrain RUN_DIR`: self-supervised pretraining of a knee encoder on the run's images
(`kneeoa.stages.pretrain`); the main CLI (`kneeoa.cli.app`) registers it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kneeoa.cli.common import config_or_defaults, guard, run_config


def pretrain_cmd(run_dir: Annotated[Path, typer.Argument(help="Run folder (its manifest lists the images).")],
                 minutes: Annotated[float | None, typer.Option(
                     "--minutes", "-m", help="Time cap in minutes (default: pretrain.max_minutes); counts every "
                     "attempt of an interrupted run.")] = None,
                 config: Annotated[Path | None, typer.Option(
                     "--config", "-c", help="Study YAML; default: RUN_DIR/config.yaml.")] = None) -> None:
    """Pretrain a knee encoder without labels (SimCLR) into RUN_DIR/encoders/kneessl/; a rerun resumes."""
    from kneeoa.config_checks import validate_config
    from kneeoa.runlock import run_lock
    from kneeoa.stages import check_inputs
    from kneeoa.stages.pretrain import run

    cfg = config_or_defaults(config) if config else run_config(run_dir)
    if minutes is not None:  # --minutes is pretrain.max_minutes for this run, checked as that key is in YAML
        cfg.pretrain.max_minutes = minutes
        guard(validate_config, cfg, "the command line (--minutes is pretrain.max_minutes)")
    guard(check_inputs, "pretrain", run_dir)

    def locked() -> Path:
        with run_lock(run_dir, f"kneeoa pretrain {run_dir}"):
            return run(run_dir, cfg, minutes=minutes)

    typer.echo(str(guard(locked)))


def run_encoders_table(run_dir: Path) -> Table:
    """The encoders pretrained in a run folder (`kneeoa models list --run RUN_DIR`): how each was made, where it is."""
    from kneeoa.models.cnn.encoder_folder import read_encoder_config
    from kneeoa.runfolder.encoders import list_encoder_dirs

    table = Table("run encoder", "backbone", "method", "images", "epochs", "minutes", "folder",
                  title=f"encoders pretrained in {run_dir}")
    folders = list_encoder_dirs(run_dir)
    for folder in folders:
        info = read_encoder_config(folder)
        table.add_row(folder.name, f"{info['backbone']} ({info['image_size']} px, {info['feature_dim']}-d)",
                      info["method"], str(info.get("n_images", "?")), str(info.get("epochs", "?")),
                      str(info.get("minutes", "?")), str(folder))
    if not folders:
        table.add_row("(none)", "", "", "", "", "", f"make one with `kneeoa pretrain {run_dir}`")
    return table
