"""Report sections, in the order they appear.

Each entry maps a section name to "module:function"; the function is `section(run_dir: Path, cfg: Config) ->
str | None` and returns an HTML fragment (figures embedded as data URIs via `kneeoa.report.figures`), or None when
the run has nothing for it. Adding a section is one entry here and one function in the module that owns it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from kneeoa.registry import Registry

SECTIONS: Registry[str] = Registry("report section")
for _name, _target in {
    "summary": "kneeoa.report.core:summary_section",
    "arms": "kneeoa.report.core:arms_section",
    "results": "kneeoa.report.core:results_section",
    "data": "kneeoa.report.core:data_section",
    "confusion": "kneeoa.report.core:confusion_section",
    "roc": "kneeoa.report.core:roc_section",
    "config": "kneeoa.report.core:config_section",
}.items():
    SECTIONS.add(_name, _target)


def get_section(name: str) -> Callable[[Path, object], str | None]:
    module, _, func = SECTIONS.get(name).partition(":")
    return getattr(importlib.import_module(module), func)
