"""Report sections, in the order they appear.

Each entry maps a section name to a lazy "module:function"; the function is `section(run_dir: Path, cfg: Config) ->
str | None` and returns an HTML fragment (figures embedded as data URIs via `kneeoa.report.figures`), or None when
the run has nothing for it. Adding a section is one entry here and one function in the module that owns it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kneeoa.registry import Registry

SECTIONS: Registry[Callable[[Path, object], str | None]] = Registry("report section")
SECTIONS.add("summary", "kneeoa.report.core:summary_section")
SECTIONS.add("arms", "kneeoa.report.core:arms_section")
SECTIONS.add("results", "kneeoa.report.core:results_section")
SECTIONS.add("comparisons", "kneeoa.report.stats_sections:comparisons_section")
SECTIONS.add("roc_ci", "kneeoa.report.stats_sections:roc_ci_section")
SECTIONS.add("calibration", "kneeoa.report.stats_sections:calibration_section")
SECTIONS.add("fusion", "kneeoa.report.fusion_sections:fusion_section")
SECTIONS.add("gradcam", "kneeoa.report.explain_sections:explain_section")
SECTIONS.add("zeroshot", "kneeoa.report.foundation_sections:zeroshot_section")
SECTIONS.add("embeddings", "kneeoa.report.foundation_sections:embeddings_section")
SECTIONS.add("four_way", "kneeoa.report.ssl_sections:four_way_section")
SECTIONS.add("data", "kneeoa.report.core:data_section")
SECTIONS.add("knee_check", "kneeoa.report.knee_check_sections:knee_check_section")
SECTIONS.add("localize", "kneeoa.report.localize_sections:localize_section")
SECTIONS.add("confusion", "kneeoa.report.core:confusion_section")
SECTIONS.add("roc", "kneeoa.report.core:roc_section")
SECTIONS.add("config", "kneeoa.report.core:config_section")


def get_section(name: str) -> Callable[[Path, object], str | None]:
    return SECTIONS.get(name)
