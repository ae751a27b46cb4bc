"""Assemble RUN_DIR/report.html from the registered sections: one self-contained file, figures embedded."""

from __future__ import annotations

import html
import logging
import traceback
from datetime import UTC, datetime
from pathlib import Path

from kneeoa.config import Config
from kneeoa.errors import KneeoaError
from kneeoa.io import write_text
from kneeoa.report.sections import SECTIONS, get_section

_logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table.tbl{border-collapse:collapse;font-size:13px;margin:.5em 0}
table.tbl th,table.tbl td{border:1px solid #ddd;padding:3px 8px;text-align:right}
table.tbl th{background:#f3f3f3}.grid{display:flex;flex-wrap:wrap;gap:8px}
pre{background:#f7f7f7;padding:1em;font-size:12px;overflow:auto}.err{color:#a00}
"""


class ReportError(KneeoaError):
    """The report was written, but some of its sections failed (each shows its error in the report)."""


def build_report(run_dir: Path, cfg: Config) -> Path:
    """Write RUN_DIR/report.html; a section that fails shows its error instead of sinking the report.

    Raises:
        ReportError: after the report is written, when any section failed (so the command exits non-zero).
    """
    run_dir = Path(run_dir)
    parts, failed = [], []
    for name in SECTIONS:
        try:
            fragment = get_section(name)(run_dir, cfg)
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others; the error is shown
            _logger.error("report section %s failed: %s", name, e)
            failed.append(f"{name} ({type(e).__name__}: {str(e)[:160]})")
            fragment = (f"<h2>{html.escape(name)}</h2><p class='err'>This section failed: {html.escape(str(e))}</p>"
                        f"<pre>{html.escape(traceback.format_exc()[-2000:])}</pre>")
        if fragment:
            parts.append(f"<section id='{name}'>{fragment}</section>")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>kneeoa report: "
            f"{html.escape(cfg.name)}</title><style>{_CSS}</style></head><body>"
            f"<h1>kneeoa report: {html.escape(cfg.name)}</h1><p>Generated {stamp} from {html.escape(str(run_dir))}. "
            "Reproduces the design of Chavoshi et al., J Imaging Inform Med 2025.</p>"
            + "".join(parts) + "</body></html>")
    path = write_text(page, run_dir / REPORT_NAME)
    if failed:
        raise ReportError(f"{path} was written, but {len(failed)} section(s) failed and show their error there: "
                          + "; ".join(failed))
    return path


def run(run_dir: Path, cfg: Config) -> None:
    build_report(run_dir, cfg)
