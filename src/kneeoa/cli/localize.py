"""Commands for knee localisation: check it on your films, build a test bed from real crops, retrain the localiser.

Registered on the main app by `kneeoa.cli.app`; each command only parses arguments and delegates to `kneeoa.localize`
and `kneeoa.synthetic`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kneeoa.config import DataCfg


def _guard(fn, *args, **kwargs):
    from kneeoa.cli.common import guard

    return guard(fn, *args, **kwargs)


def _fail(error) -> None:
    from kneeoa.cli.common import fail

    fail(error)


def localize_cmd(
    films: Annotated[list[Path], typer.Argument(help="Film files: DICOM, PNG or JPEG.")],
    out: Annotated[Path, typer.Option("--out", "-o",
                                      help="Folder for crops/, overview/ (PNG + JSON) and localize.csv.")],
    kind: Annotated[str, typer.Option(help="bilateral (two knees, right on the image left) or single.")] = "bilateral",
    side: Annotated[str | None, typer.Option(help="R or L: the knee single-knee films show.")] = None,
    localizer: Annotated[str, typer.Option(help="A registered localiser.")] = DataCfg.localizer,
    crop_mm: Annotated[float, typer.Option(help="Side of the square crop in mm.")] = DataCfg.crop_mm,
    image_size: Annotated[int, typer.Option(help="Crop size in pixels.")] = DataCfg.image_size,
    spacing_mm: Annotated[float | None, typer.Option(help="Pixel spacing to assume for files without one.")] = None,
    workers: Annotated[int, typer.Option(help="Processes.")] = 1,
) -> None:
    """Localise the knees on FILMS and write crops, an overview per film and OUT/localize.csv (one row per knee)."""
    from kneeoa.config import Config
    from kneeoa.config_checks import validate_config
    from kneeoa.localize.check import check_films

    cfg = Config()  # the flags are the data keys of a config, and pass the checks those keys pass in YAML
    for key, value in {"localizer": localizer, "crop_mm": crop_mm, "image_size": image_size,
                       "default_spacing_mm": spacing_mm, "workers": workers}.items():
        setattr(cfg.data, key, value)
    _guard(validate_config, cfg, "the command line")

    table = _guard(check_films, films, out, kind=kind, side=side, localizer=localizer, crop_mm=crop_mm,
                   image_size=image_size, spacing_mm=spacing_mm, workers=workers)
    ok = int((table["status"] == "ok").sum())
    typer.echo(f"{ok} knee(s) cropped, {len(table) - ok} quarantined, from {len(films)} film(s) -> "
               f"{Path(out) / 'localize.csv'}")
    if not ok:
        raise typer.Exit(1)  # asked for crops, cropped nothing


def crop_films_cmd(
    crops: Annotated[Path, typer.Argument(help="kneeKL224-style folder: <split>/<KL>/<OAI id><L|R>.png.")],
    out: Annotated[Path, typer.Argument(help="Folder to write (films/ + truth.csv, or an OAI-shaped release).")],
    split: Annotated[str, typer.Option(help="Split whose crops are used (train to tune, val to measure).")] = "val",
    films: Annotated[int | None, typer.Option("--films", "-n", help="Films (one per patient); default all.")] = None,
    seed: Annotated[int, typer.Option(help="Seed (same seed, same films).")] = 0,
    oai: Annotated[bool, typer.Option("--oai", help="Write an OAI-shaped release for `kneeoa prepare oai`.")] = False,
    workers: Annotated[int, typer.Option(help="Processes writing films.")] = 1,
    exposure: Annotated[str, typer.Option(help="Exposure range: standard, or wide (underexposed, washed-out and "
                                               "saturated films too).")] = "standard",
) -> None:
    """Compose bilateral PA DICOM films from real knee crops, with the true joint centres in OUT/truth.csv."""
    from kneeoa.errors import ConfigError
    from kneeoa.synthetic.crop_films import VARIETIES, write_crop_films, write_crop_release

    if exposure not in VARIETIES:
        _fail(ConfigError(f"--exposure is {exposure!r}; expected one of {', '.join(VARIETIES)}."))
    write = write_crop_release if oai else write_crop_films
    truth = _guard(write, crops, out, split=split, films=films, seed=seed, workers=workers,
                   variety=VARIETIES[exposure])
    typer.echo(f"{truth['film'].nunique()} film(s), {int((truth['content'] == 'knee').sum())} knee(s) -> {out}; "
               f"truth: {Path(out) / 'truth.csv'}")


def localize_train_cmd(
    crops: Annotated[Path, typer.Argument(help="kneeKL224-style folder; its train split is used.")],
    stage: Annotated[str, typer.Option(help="Network to train: coarse (whole film, 3 mm) or refine (1 mm window).")
                     ] = "coarse",
    out: Annotated[Path | None, typer.Option(help="Weights file; default: the stage's packaged one (overwritten).")
                   ] = None,
    films: Annotated[int, typer.Option(help="Training films drawn in memory.")] = 2400,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed (same seed and machine, same weights).")] = 0,
) -> None:
    """Retrain one network of the heatmap knee localiser on CPU from films composed from train crops and phantoms."""
    from kneeoa.localize.train import STAGES, train_localizer

    result = _guard(train_localizer, crops, stage=stage, out=out, films=films, epochs=epochs, seed=seed)
    typer.echo(" ".join(f"{k}={v:.3g}" for k, v in result.items()) + f" -> {out or STAGES[stage][1]}")
