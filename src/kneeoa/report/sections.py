"""Report sections, in the order they appear.

Each entry maps a section name to "module:function"; the function is `section(run_dir: Path, cfg: Config) ->
str | None` and returns an HTML fragment (figures embedded as data URIs via `kneeoa.report.figures`), or None when
the run has nothing for it. Adding a section is one entry here and one function in the module that owns it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kneeoa.registry import Registry

SECTIONS: Registry[str] = Registry("report section")
SECTIONS.update({
    "summary": "kneeoa.report.core:summary_section",
    "arms": "kneeoa.report.core:arms_section",
    "results": "kneeoa.report.core:results_section",
    "comparisons": "kneeoa.report.stats_sections:comparisons_section",
    "roc_ci": "kneeoa.report.stats_sections:roc_ci_section",
    "calibration": "kneeoa.report.stats_sections:calibration_section",
    "fusion": "kneeoa.report.fusion_sections:fusion_section",
    "gradcam": "kneeoa.report.explain_sections:explain_section",
    "zeroshot": "kneeoa.report.foundation_sections:zeroshot_section",
    "embeddings": "kneeoa.report.foundation_sections:embeddings_section",
    "four_way": "kneeoa.report.ssl_sections:four_way_section",
    "data": "kneeoa.report.core:data_section",
    "knee_check": "kneeoa.report.knee_check_sections:knee_check_section",
    "localize": "kneeoa.report.localize_sections:localize_section",
    "confusion": "kneeoa.report.core:confusion_section",
    "roc": "kneeoa.report.core:roc_section",
    "config": "kneeoa.report.core:config_section",
})


def get_section(name: str) -> Callable[[Path, object], str | None]:
    return SECTIONS.load(name)
