"""The `kneeoa` command line: one sub-command per stage, plus `run` (a config file) and `demo`.

Commands only parse arguments and delegate to the stages; every stage can also be run alone on a run folder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.logging import RichHandler

from kneeoa.cli.common import config_or_defaults as _cfg
from kneeoa.cli.common import console
from kneeoa.cli.common import guard as _guard
from kneeoa.cli.common import run_config as _run_cfg
from kneeoa.cli.deploy import export_cmd, predict_cmd, serve_cmd
from kneeoa.cli.localize import crop_films_cmd, localize_cmd, localize_train_cmd
from kneeoa.cli.models import boost_cmd, embed_cmd, models_app, zeroshot_cmd
from kneeoa.cli.prepare import prepare_app
from kneeoa.cli.pretrain import pretrain_cmd
from kneeoa.config import preset
from kneeoa.config_checks import load_config, validate_config
from kneeoa.registry import Registry

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Reproduce and audit the knee-radiograph OA feature study, end to end.")
app.add_typer(prepare_app, name="prepare")

#: Libraries whose own log records (decoder tracebacks, plugin notices) are shown only with --verbose.
QUIET_LIBRARIES = ("pydicom", "PIL")

RunDir = Annotated[Path, typer.Option("--out", "-o", help="Run folder to write (created if missing).")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Study YAML; default: built-in defaults.")]


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    handler = RichHandler(console=console, show_path=False)
    if not verbose:  # libraries' failures reach the user as kneeoa's named errors; --verbose shows their records
        handler.addFilter(lambda record: record.name.split(".")[0] not in QUIET_LIBRARIES)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler])


@app.command()
def demo(out: RunDir = Path("runs/demo"),
         quick: Annotated[bool, typer.Option("--quick", help="A minutes-long smoke run on a tiny phantom.")] = False,
         ) -> None:
    """Run the whole study on the built-in synthetic phantom knees and print the report's path."""
    from kneeoa.study import run_study

    cfg = preset("demo_quick" if quick else "demo")
    timings = _guard(run_study, cfg, out)
    console.print(f"stage timings (s): {timings}")
    typer.echo(str((out / "report.html").resolve()))


@app.command("run")
def run_cmd(config: Annotated[Path, typer.Argument(help="Study YAML (partial: missing keys keep defaults).")],
            out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder; default runs/<name>.")] = None,
            stages: Annotated[str | None, typer.Option(help="Comma-separated stages to run (default: all).")] = None,
            ) -> None:
    """Run a study from a config file."""
    from kneeoa.study import run_study

    cfg = _guard(load_config, config)
    out = out or Path("runs") / cfg.name
    _guard(run_study, cfg, out, stages=stages.split(",") if stages else None)
    report = out / "report.html"
    typer.echo(str(report.resolve()) if report.exists() else f"{out} (no report.html: the report stage did not run)")


@app.command()
def phantom(out: RunDir, patients: Annotated[int | None, typer.Option(help="Number of patients.")] = None,
            visits: Annotated[int | None, typer.Option(help="Visits per patient.")] = None,
            seed: Annotated[int | None, typer.Option(help="Random seed (same seed, same bytes).")] = None,
            image_size: Annotated[int | None, typer.Option(help="Crop size in pixels.")] = None,
            low_quality_share: Annotated[float | None, typer.Option(
                help="Share of deliberately low-quality images.")] = None,
            config: ConfigOpt = None) -> None:
    """Generate synthetic knee radiographs with known features into OUT (crops, masks, manifest).

    Each option overrides the config (--config, else the defaults) only when given.
    """
    from kneeoa.stages.prepare import prepare

    cfg = _cfg(config)
    cfg.seed = cfg.seed if seed is None else seed
    given = {"patients": patients, "visits": visits, "image_size": image_size, "low_quality_share": low_quality_share}
    for key, value in given.items():
        if value is not None:
            setattr(cfg.data, key, value)
    _guard(validate_config, cfg, "the command line (with the config)")  # flags pass the checks YAML keys pass
    df = _guard(prepare, out, cfg, source="phantom")
    typer.echo(f"{len(df)} images of {df['patient_id'].nunique()} patients -> {out / 'manifest.parquet'}")


@app.command("phantom-release")
def phantom_release(
    out: Annotated[Path, typer.Argument(help="Release folder to write (kXR_SQ_BU tables, <month>/contents.csv, "
                                             "DICOM films, truth.csv).")],
    patients: Annotated[int, typer.Option("--patients", "-n", help="Phantom patients.")] = 20,
    visits: Annotated[int, typer.Option(help="Visits per patient, 1-7 (OAI 00, 01, 03, 05, 06, 08, 10).")] = 2,
    seed: Annotated[int, typer.Option(help="Cohort seed.")] = 0,
    low_quality_share: Annotated[float, typer.Option(help="Share of degraded knees.")] = 0.0,
    spacing_mm: Annotated[list[float] | None, typer.Option(help="Pixel spacings to draw films from (repeat the "
                                                           "option); default 0.14-0.2 mm.")] = None,
    workers: Annotated[int, typer.Option(help="Processes rendering films.")] = 2,
) -> None:
    """Write an OAI-shaped release of phantom bilateral PA knee films (DICOM), for `kneeoa prepare oai OUT`."""
    from kneeoa.synthetic.phantom.films import write_phantom_release

    kwargs = {"spacings_mm": tuple(spacing_mm)} if spacing_mm else {}
    truth = _guard(write_phantom_release, out, patients=patients, visits=visits, seed=seed,
                   low_quality_share=low_quality_share, workers=workers, **kwargs)
    films = truth.loc[truth["has_film"], "film_path"].nunique()
    typer.echo(f"{films} film(s), {int(truth['has_reading'].sum())} knee reading(s) -> {out}; truth: "
               f"{Path(out) / 'truth.csv'}")


#: Stages whose command prints what it made and exits 1 when it made nothing it was asked for:
#: "module:function" of `outcome(run_dir, cfg) -> (lines, made_something)`.
_OUTCOMES: Registry[Callable[[Path, object], tuple[list[str], bool]]] = Registry("stage outcome")
_OUTCOMES.add("fusion", "kneeoa.stages.fusion:outcome")
_OUTCOMES.add("explain", "kneeoa.stages.explain:outcome")


def _stage_command(name: str, doc: str) -> None:
    def command(run_dir: Annotated[Path, typer.Argument(help="Run folder.")], config: ConfigOpt = None) -> None:
        from kneeoa.runlock import run_lock
        from kneeoa.stages import check_inputs, get_stage

        cfg = _cfg(config) if config else _run_cfg(run_dir)
        _guard(check_inputs, name, run_dir)  # before the lock, which would create a mistyped folder

        def locked() -> None:
            with run_lock(run_dir, f"kneeoa {name} {run_dir}"):
                get_stage(name)(run_dir, cfg)

        _guard(locked)
        if name in _OUTCOMES:
            lines, made = _OUTCOMES.get(name)(run_dir, cfg)
            for line in lines:
                typer.echo(line)
            if not made:
                raise typer.Exit(1)  # asked for arms or maps, made none

    command.__doc__ = doc
    app.command(name)(command)


for _name, _doc in {
    "train": "Train the CNN arms (cnn.backbones) and write their prediction tables.",
    "fusion": "Hybrid arms over fusion.arms: a stacker cross-fitted on val, and concatenated features into the "
              "boost heads.",
    "evaluate": "Compute metrics for every prediction table into metrics.csv / metrics.json.",
    "stats": "Bootstrap CIs (by patient), calibration, paired arm comparisons -> metrics.csv, comparisons.csv.",
    "explain": "Grad-CAM (CNN arms) and occlusion (every re-runnable arm) montages in figures/, and their "
               "in-mask scores (phantom) -> metrics.csv.",
    "report": "Write RUN_DIR/report.html.",
}.items():
    _stage_command(_name, _doc)


# --- foundation models: weights, embeddings, heads, zero-shot (kneeoa.cli.models); knee SSL (kneeoa.cli.pretrain)
app.add_typer(models_app, name="models")
app.command("embed")(embed_cmd)
app.command("boost")(boost_cmd)
app.command("zeroshot")(zeroshot_cmd)
app.command("pretrain")(pretrain_cmd)

# --- using a trained arm: model package, batch prediction, web viewer (kneeoa.cli.deploy) -----------------------
app.command("export")(export_cmd)
app.command("predict")(predict_cmd)
app.command("serve")(serve_cmd)

# --- knee localisation: check crops on films, real-crop test bed, retraining (kneeoa.cli.localize) -------------
app.command("localize")(localize_cmd)
app.command("crop-films")(crop_films_cmd)
app.command("localize-train")(localize_train_cmd)
