"""What every `kneeoa` command shares: the error console, the guard that turns user-fixable errors into one line and
exit code 2, and the config a command runs with. The app (`kneeoa.cli.app`) and the command modules it registers
(`kneeoa.cli.deploy`, `.localize`, `.models`, `.prepare`, `.pretrain`) import this module, never each other, so the
command line has no import cycle.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from kneeoa.config import Config
from kneeoa.config_checks import load_config
from kneeoa.errors import KneeoaError

console = Console(stderr=True)


def guard(fn, *args, **kwargs):
    """Run a command body; user-fixable errors print one clear line and exit 2 instead of a traceback."""
    try:
        return fn(*args, **kwargs)
    except KneeoaError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from e


def fail(error: KneeoaError) -> None:
    """Report a user-fixable error found by a command itself (a bad option combination) as `guard` does: exit 2."""

    def raise_it() -> None:
        raise error

    guard(raise_it)


def config_or_defaults(path: Path | None) -> Config:
    """The config file `path` (a bad one exits 2 with its error), else the built-in defaults."""
    return guard(load_config, path) if path else Config()


def run_config(run_dir: Path) -> Config:
    """The config a run folder was made with (RUN_DIR/config.yaml), else defaults."""
    path = Path(run_dir) / "config.yaml"
    return guard(load_config, path) if path.exists() else Config()
