"""The `kneeoa` command line: the app (`kneeoa.cli.app`) and one module of commands per concern.

Commands only parse arguments and delegate; the console script `kneeoa` is `kneeoa.cli:app`.
"""

from kneeoa.cli.app import app

__all__ = ["app"]
