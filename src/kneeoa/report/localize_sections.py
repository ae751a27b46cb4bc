"""Report section for knee localisation: the film overviews `kneeoa prepare` drew, so a reader can check the crops.

The OAI importer draws, into RUN_DIR/figures/localize/ (`kneeoa.runfolder.manifest.OVERVIEW_DIR`), a sample of films
(`OVERVIEW_SAMPLE`, evenly spread) and every film with a knee that was not cropped: the film reduced to 800 px wide,
each cropped knee's square in green with its confidence, each missed side in red. Next to each PNG a JSON says
which film it is, what was found and why a knee was missed. This section shows the sample first, then the misses.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from kneeoa.config import Config
from kneeoa.report.figures import png_tag
from kneeoa.runfolder.manifest import OVERVIEW_DIR

#: At most this many overviews of films with a missed knee are shown (all are in the run folder).
MAX_MISSED = 12


def _figure(png: Path, info: dict) -> str:
    found = ", ".join(f"{side} {k['confidence']:.2f}" for side, k in info["found"].items()) or "none"
    lines = [f"{Path(info['film']).name} ({', '.join(info['image_ids'].values())})", f"cropped: {found}"]
    lines += [f"{side} not cropped: {reason}" for side, reason in info["missed"].items()]
    caption = "<br>".join(html.escape(line) for line in lines)
    return (f"<figure style='display:inline-block;margin:4px;vertical-align:top;max-width:400px;font-size:11px'>"
            f"{png_tag(png.read_bytes(), alt=Path(info['film']).name, width=400)}<figcaption>{caption}</figcaption>"
            "</figure>")


def localize_section(run_dir: Path, cfg: Config) -> str | None:
    """Film overviews with the knee crops drawn: the sample of films, then films with a knee not cropped."""
    folder = Path(run_dir) / OVERVIEW_DIR
    drawn = [(png, json.loads(png.with_suffix(".json").read_text())) for png in sorted(folder.glob("*.png"))
             if png.with_suffix(".json").exists()]
    if not drawn:
        return None
    missed = [(png, info) for png, info in drawn if info["missed"]]
    sample = [(png, info) for png, info in drawn if not info["missed"]]
    parts = ["<h2>Knee localisation</h2>",
             f"<p>Films as the importer saw them, with the {cfg.data.crop_mm:g} mm square cropped around each knee "
             f"(localiser <code>{html.escape(cfg.data.localizer)}</code>; green: cropped, with its confidence; red: "
             f"not cropped, with the reason). {len(sample)} film(s) of the sample had both knees cropped; "
             f"{len(missed)} film(s) had a knee not cropped. All overviews: <code>{OVERVIEW_DIR}/</code>.</p>"]
    parts += [_figure(png, info) for png, info in sample]
    if missed:
        parts.append(f"<h3>Films with a knee not cropped ({len(missed)}"
                     f"{f', first {MAX_MISSED} shown' if len(missed) > MAX_MISSED else ''})</h3>")
        parts += [_figure(png, info) for png, info in missed[:MAX_MISSED]]
    return "".join(parts)
