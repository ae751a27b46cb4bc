"""`kneeoa prepare <importer> [PATH] --out RUN_DIR [--config X] [--<option> ...]`, one sub-command per registered
importer, built from its registry entry (`kneeoa.sources.importers.IMPORTERS`) when the command line is parsed, so an
importer registered at runtime has its sub-command with no other edit. Flags override the config's values only when
given; the result is written to RUN_DIR/config.yaml by the prepare stage.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from kneeoa.cli.common import config_or_defaults, guard
from kneeoa.config_checks import validate_config
from kneeoa.sources.importers import IMPORTERS, ImporterSpec, set_importer_option


def _body(name: str, spec: ImporterSpec):
    def command(**kwargs: Any) -> None:
        from kneeoa.stages.prepare import prepare

        out, config, path = kwargs.pop("out"), kwargs.pop("config"), kwargs.pop("path", None)
        cfg = config_or_defaults(config)
        for option, value in kwargs.items():
            if value is not None:
                set_importer_option(cfg, name, option, value)
        guard(validate_config, cfg, "the command line (with the config)")  # flags pass the checks YAML keys pass
        df = guard(prepare, out, cfg, source=name, path=path)
        typer.echo(f"{len(df)} images of {df['patient_id'].nunique()} patients -> {out / 'manifest.parquet'}; "
                   f"data report: {out / 'data_report.json'}")

    params = []
    if spec.path_help is not None:
        params.append(inspect.Parameter("path", inspect.Parameter.KEYWORD_ONLY,
                                        annotation=Annotated[Path, typer.Argument(help=spec.path_help)]))
    params += [
        inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[
            Path, typer.Option("--out", "-o", help="Run folder to write (created if missing).")]),
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Path | None, typer.Option("--config", "-c", help="Study YAML; default: built-in defaults.")]),
    ]
    params += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        o.type | None, typer.Option(f"--{o.name.replace('_', '-')}", help=f"{o.help} (default: the config's).")])
        for o in spec.options if o.flag]
    command.__signature__ = inspect.Signature(params)
    command.__doc__ = spec.summary
    return command


class ImporterCommands(TyperGroup):
    """The `prepare` group: its sub-commands are the importers registered when the command line is parsed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return guard(IMPORTERS.names)  # a broken importer plugin: one line and exit 2, not a traceback

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if not guard(IMPORTERS.__contains__, cmd_name):
            return None
        single = typer.Typer()
        single.command(cmd_name)(_body(cmd_name, guard(IMPORTERS.get, cmd_name)))
        return typer.main.get_command(single)


prepare_app = typer.Typer(cls=ImporterCommands, no_args_is_help=True,
                          help="Import a data source into RUN_DIR/manifest.parquet (one sub-command per importer).")
