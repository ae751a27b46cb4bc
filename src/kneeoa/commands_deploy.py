"""Command-line entry points for using a trained arm: `kneeoa export`, `predict` and `serve`.

Commands parse options and delegate to `kneeoa.deploy`; the main CLI (`kneeoa.cli`) registers them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kneeoa.commands_common import guard as _guard

ModelDir = Annotated[Path, typer.Argument(help="Model package folder (made by `kneeoa export`).")]
EncoderWeights = Annotated[Path | None, typer.Option(
    "--encoder-weights", help="Embedding arms: the encoder snapshot folder on this machine (default: where the run "
    "loaded it from).")]


def export_cmd(run_dir: Annotated[Path, typer.Argument(help="Run folder whose arm ran.")],
               arm: Annotated[str, typer.Option("--arm", "-a", help="Arm to package, e.g. resnet18, raddino_xgb.")],
               out: Annotated[Path, typer.Option("--out", "-o", help="Model package folder to write.")],
               overwrite: Annotated[bool, typer.Option(help="Replace an existing package at OUT.")] = False) -> None:
    """Package one trained arm (weights, preprocessing, decoding, metrics, model card) into a model folder."""
    from kneeoa.deploy.package import export_arm

    typer.echo(str(_guard(export_arm, run_dir, arm, out, overwrite=overwrite)))


def predict_cmd(model_dir: ModelDir,
                inputs: Annotated[list[Path], typer.Argument(help="DICOM films, crops (PNG/JPEG/DICOM), folders of "
                                                             "them, or CSV lists (columns file[, kind, side]).")],
                out: Annotated[Path, typer.Option("--out", "-o", help="Folder for predictions.csv, crops/, cam/.")],
                cam: Annotated[bool, typer.Option("--cam", help="Write Grad-CAM overlays per knee and task.")] = False,
                kind: Annotated[str | None, typer.Option(help="bilateral, single or crop for every file (default: "
                                                              "detected per file).")] = None,
                side: Annotated[str | None, typer.Option(help="R or L for single-knee files and crops that do not "
                                                              "say.")] = None,
                batch_size: Annotated[int, typer.Option(help="Files graded per batch.")] = 16,
                encoder_weights: EncoderWeights = None) -> None:
    """Grade every knee of new films with a model package: OUT/predictions.csv (+ OUT/cam/ with --cam)."""
    from kneeoa.deploy.inputs import collect_inputs
    from kneeoa.deploy.package import load_model
    from kneeoa.deploy.predict import predict_files

    items = _guard(collect_inputs, inputs, kind=kind, side=side)
    model = _guard(load_model, model_dir, encoder_weights=encoder_weights)
    table = _guard(predict_files, model, items, out, cam=cam, batch_size=batch_size)
    bad = table["error"].fillna("").ne("")
    typer.echo(f"{int((~bad).sum())} knee(s) graded, {int(bad.sum())} file(s) not graded -> {out / 'predictions.csv'}")


def serve_cmd(model_dir: ModelDir,
              host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
              port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
              max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload, in MB.")] = 64.0,
              encoder_weights: EncoderWeights = None) -> None:
    """Serve a model package: an upload page and a JSON API (POST /api/predict, GET /api/model, GET /healthz)."""
    from kneeoa.deploy.serve import serve

    _guard(serve, model_dir, host=host, port=port, max_upload_mb=max_upload_mb, encoder_weights=encoder_weights)
