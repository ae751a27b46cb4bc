"""The `kneeoa` command line: one sub-command per stage, plus `run` (a config file) and `demo`.

Commands only parse arguments and delegate to the stages; every stage can also be run alone on a run folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from kneeoa.config import Config, load_config, preset
from kneeoa.errors import KneeoaError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Reproduce and audit the knee-radiograph OA feature study, end to end.")
prepare_app = typer.Typer(no_args_is_help=True, help="Import a data source into RUN_DIR/manifest.parquet.")
app.add_typer(prepare_app, name="prepare")
console = Console(stderr=True)

RunDir = Annotated[Path, typer.Option("--out", "-o", help="Run folder to write (created if missing).")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Study YAML; default: built-in defaults.")]


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])


def _cfg(path: Path | None) -> Config:
    return load_config(path) if path else Config()


def _run_cfg(run_dir: Path) -> Config:
    """The config a run folder was made with (RUN_DIR/config.yaml), else defaults."""
    path = Path(run_dir) / "config.yaml"
    return load_config(path) if path.exists() else Config()


def _guard(fn, *args, **kwargs):
    """Run a command body; user-fixable errors print one clear line and exit 2 instead of a traceback."""
    try:
        return fn(*args, **kwargs)
    except KneeoaError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from e


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
    typer.echo(str((out / "report.html").resolve()))


@app.command()
def phantom(out: RunDir, patients: Annotated[int, typer.Option(help="Number of patients.")] = 100,
            visits: Annotated[int, typer.Option(help="Visits per patient.")] = 2,
            seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
            image_size: Annotated[int, typer.Option(help="Crop size in pixels.")] = 224,
            low_quality_share: Annotated[float, typer.Option(help="Share of deliberately low-quality images.")] = 0.08,
            config: ConfigOpt = None) -> None:
    """Generate synthetic knee radiographs with known features into OUT (crops, masks, manifest)."""
    from kneeoa.stages.prepare import prepare

    cfg = _cfg(config)
    cfg.seed = seed
    cfg.data.patients, cfg.data.visits = patients, visits
    cfg.data.image_size, cfg.data.low_quality_share = image_size, low_quality_share
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
    from kneeoa.data.phantom_films import write_phantom_release

    kwargs = {"spacings_mm": tuple(spacing_mm)} if spacing_mm else {}
    truth = _guard(write_phantom_release, out, patients=patients, visits=visits, seed=seed,
                   low_quality_share=low_quality_share, workers=workers, **kwargs)
    films = truth.loc[truth["has_film"], "film_path"].nunique()
    typer.echo(f"{films} film(s), {int(truth['has_reading'].sum())} knee reading(s) -> {out}; truth: "
               f"{Path(out) / 'truth.csv'}")


def _prepare(source: str, path: Path, out: Path, config: Path | None) -> None:
    from kneeoa.stages.prepare import prepare

    df = _guard(prepare, out, _cfg(config), source=source, path=path)
    typer.echo(f"{len(df)} images of {df['patient_id'].nunique()} patients -> {out / 'manifest.parquet'}; "
               f"data report: {out / 'data_report.json'}")


@prepare_app.command("folders")
def prepare_folders(path: Annotated[Path, typer.Argument(help="<root>/[<split>/]<KL>/<id><L|R>.png tree.")],
                    out: RunDir, config: ConfigOpt = None) -> None:
    """Import a folder-per-grade set such as kneeKL224 (KL only)."""
    _prepare("folders", path, out, config)


@prepare_app.command("oai")
def prepare_oai(path: Annotated[Path, typer.Argument(help="OAI release folder (contents.csv + kXR_SQ_BU tables).")],
                out: RunDir, config: ConfigOpt = None) -> None:
    """Import an OAI-shaped release: bilateral PA DICOM films -> per-knee crops with OARSI and KL readings."""
    _prepare("oai", path, out, config)


@prepare_app.command("csv")
def prepare_csv(path: Annotated[Path, typer.Argument(help="Table with image path, patient id, side, visit, labels.")],
                out: RunDir, config: ConfigOpt = None) -> None:
    """Import hospital data described by a CSV table (columns mapped by data.csv_columns)."""
    _prepare("csv", path, out, config)


def _stage_command(name: str, doc: str) -> None:
    def command(run_dir: Annotated[Path, typer.Argument(help="Run folder.")], config: ConfigOpt = None) -> None:
        from kneeoa.stages import get_stage

        cfg = load_config(config) if config else _run_cfg(run_dir)
        _guard(get_stage(name), run_dir, cfg)

    command.__doc__ = doc
    app.command(name)(command)


for _name, _doc in {
    "train": "Train the CNN arms (cnn.backbones) and write their prediction tables.",
    "evaluate": "Compute metrics for every prediction table into metrics.csv / metrics.json.",
    "stats": "Bootstrap CIs (by patient), calibration, paired arm comparisons -> metrics.csv, comparisons.csv.",
    "explain": "Grad-CAM montages in figures/gradcam/ and CAM-in-mask scores (phantom) -> metrics.csv.",
    "report": "Write RUN_DIR/report.html.",
}.items():
    _stage_command(_name, _doc)


# --- foundation models: weights, embeddings, heads, zero-shot (kneeoa.commands_models) ------------------------------
from kneeoa.commands_models import boost_cmd, embed_cmd, models_app, zeroshot_cmd  # noqa: E402

app.add_typer(models_app, name="models")
app.command("embed")(embed_cmd)
app.command("boost")(boost_cmd)
app.command("zeroshot")(zeroshot_cmd)

# --- using a trained arm: model package, batch prediction, web viewer (kneeoa.commands_deploy) -----------------------
from kneeoa.commands_deploy import export_cmd, predict_cmd, serve_cmd  # noqa: E402

app.command("export")(export_cmd)
app.command("predict")(predict_cmd)
app.command("serve")(serve_cmd)

# --- knee localisation: check crops on films, real-crop test bed, retraining (kneeoa.commands_localize) -------------
from kneeoa.commands_localize import crop_films_cmd, localize_cmd, localize_train_cmd  # noqa: E402

app.command("localize")(localize_cmd)
app.command("crop-films")(crop_films_cmd)
app.command("localize-train")(localize_train_cmd)
