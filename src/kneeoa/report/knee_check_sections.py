"""Report section for the knee check `kneeoa prepare` ran: how many imported images it finds unlike knees, and which.

The check (`data.knee_check`: a grader's fitted knee check, `kneeoa.models.knee_check`) only flags: the images stay
in the manifest (`not_knee`, `knee_score`), so the study still runs on them and a reader decides.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from kneeoa.config import Config
from kneeoa.report.figures import table_html
from kneeoa.runfolder.manifest import read_data_report


def knee_check_section(run_dir: Path, cfg: Config) -> str | None:
    report = read_data_report(run_dir)
    if report is None:
        return None
    check = report.get("knee_check")
    if check is None:
        return ("<h2>Knee check</h2><p>Not run on this import (<code>data.knee_check: "
                f"{html.escape(str(cfg.data.knee_check))}</code>, or the run was prepared before it existed).</p>")
    parts = ["<h2>Knee check</h2>",
             f"<p>The knee check of <code>{html.escape(str(cfg.data.knee_check))}</code> scored {check['checked']} "
             f"imported image(s): <b>{check['not_knee']}</b> look unlike the knees it was fitted on "
             "(<code>not_knee</code> in the manifest; they were kept). A grader with this check would refuse them.</p>"]
    if check["not_knee"]:
        parts.append("<h3>Flagged per split</h3>"
                     + table_html(pd.DataFrame([check["per_split"]]).rename(index={0: "images"}), index=True))
        parts.append(f"<h3>Flagged images (first {len(check['images'])})</h3>"
                     + table_html(pd.DataFrame(check["images"])))
    return "".join(parts)
