"""Command-line entry points for using a trained arm: `kneeoa export`, `predict` and `serve`.

Commands parse options and delegate to `kneeoa.deploy`; the main CLI (`kneeoa.cli.app`) registers them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kneeoa.cli.common import fail as _fail
from kneeoa.cli.common import guard as _guard

ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="A built-in grader's name (`kneeoa models list`) or a model package folder (made by "
    "`kneeoa export`); default: the built-in grader.")]
EncoderWeights = Annotated[Path | None, typer.Option(
    "--encoder-weights", help="Embedding arms: the encoder snapshot folder on this machine (default: where the run "
    "loaded it from).")]


def export_cmd(run_dir: Annotated[Path, typer.Argument(help="Run folder whose arm ran.")],
               arm: Annotated[str, typer.Option("--arm", "-a", help="Arm to package, e.g. resnet18, raddino_xgb.")],
               out: Annotated[Path | None, typer.Option("--out", "-o", help="Model package folder to write.")] = None,
               builtin: Annotated[str | None, typer.Option(
                   help="Instead of --out: rebuild the built-in grader of this name inside kneeoa from the run "
                        "(checked to reproduce the run's val predictions).")] = None,
               overwrite: Annotated[bool, typer.Option(help="Replace an existing package at OUT.")] = False,
               knee_check_alpha: Annotated[float, typer.Option(
                   min=0.0001, max=0.5, help="Share of knees like the training ones the package's knee check may "
                   "refuse (needs 1/alpha calibration knees).")] = 0.005) -> None:
    """Package one trained arm (weights, preprocessing, decoding, knee check, metrics, model card) into a model
    folder, or rebuild a built-in grader from it (--builtin NAME)."""
    from kneeoa.errors import ConfigError

    if (out is None) == (builtin is None):
        _fail(ConfigError("Give exactly one of --out MODEL_DIR and --builtin NAME."))
    if builtin:
        from kneeoa.deploy.builtin import build_builtin, builtin_notes

        typer.echo(str(_guard(build_builtin, run_dir, arm, builtin, card_notes=builtin_notes(run_dir, arm,
                                                                                              builtin))))
        return
    from kneeoa.deploy.package import export_arm

    typer.echo(str(_guard(export_arm, run_dir, arm, out, overwrite=overwrite, knee_check_alpha=knee_check_alpha)))


def predict_cmd(inputs: Annotated[list[Path], typer.Argument(help="DICOM films, crops (PNG/JPEG/DICOM), folders of "
                                                             "them, or CSV lists (columns file[, kind, side]).")],
                out: Annotated[Path, typer.Option("--out", "-o", help="Folder for predictions.csv, crops/, cam/.")],
                model: ModelOpt = None,
                cam: Annotated[bool, typer.Option("--cam", help="Write Grad-CAM overlays per knee and task.")] = False,
                kind: Annotated[str | None, typer.Option(help="bilateral, single or crop for every file (default: "
                                                              "detected per file).")] = None,
                side: Annotated[str | None, typer.Option(help="R or L for single-knee files and crops that do not "
                                                              "say.")] = None,
                batch_size: Annotated[int, typer.Option(help="Files graded per batch.")] = 16,
                knee_check: Annotated[bool, typer.Option(help="Refuse images the fitted knee check finds unlike "
                                                              "the grader's training knees (scores are written "
                                                              "either way).")] = True,
                encoder_weights: EncoderWeights = None) -> None:
    """Grade every knee of new films: OUT/predictions.csv (+ OUT/cam/ with --cam), with the built-in grader unless
    --model names another."""
    from kneeoa.api import load_model

    grader = _guard(load_model, model, encoder_weights=encoder_weights)
    table = _guard(grader.predict, inputs, out=out, cam=cam, kind=kind, side=side, batch_size=batch_size,
                   knee_check=knee_check, progress=True)
    bad = table["error"].fillna("").ne("")
    typer.echo(f"{int((~bad).sum())} knee(s) graded, {int(bad.sum())} file(s) or knee(s) not graded (reasons in "
               f"the error column) -> {out / 'predictions.csv'}")
    if not (~bad).any():
        raise typer.Exit(1)  # asked to grade, graded nothing


def serve_cmd(model: ModelOpt = None,
              host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
              port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
              max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload, in MB.")] = 64.0,
              encoder_weights: EncoderWeights = None) -> None:
    """Serve a grader (the built-in one unless --model names another): an upload page and a JSON API
    (POST /api/predict, GET /api/model, GET /healthz)."""
    from kneeoa.deploy.builtin import resolve_model
    from kneeoa.deploy.serve import serve

    _guard(serve, _guard(resolve_model, model), host=host, port=port, max_upload_mb=max_upload_mb,
           encoder_weights=encoder_weights)
