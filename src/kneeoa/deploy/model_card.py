"""The model card (README.md of a model package): intended use, training data, metrics with CIs, limits."""

from __future__ import annotations

from typing import Any

import pandas as pd

_LIMITS = """\
- **Not a medical device.** Research software: it has no regulatory clearance and must not be used for diagnosis,
  treatment or any clinical decision.
- Trained and evaluated on the data summarised above only. On films from other scanners, populations, projections
  (it expects bilateral or single-knee PA fixed-flexion views) or on synthetic phantoms versus real radiographs, its
  accuracy is unknown until measured there.
- A knee is only graded where the localiser found a plausible joint; check the localiser confidence and QC flags.
  Sides come from the film's layout (patient's right knee on the image left), not from burned-in markers.
- Probabilities are the model's, not calibrated risks; see the calibration section of the run's report."""


def _metrics_table(metrics: pd.DataFrame) -> str:
    if metrics.empty:
        return "No metrics were computed for this arm (run `kneeoa evaluate` and `kneeoa stats` before exporting)."
    lines = ["| task | split | metric | value | 95% CI | n |", "|---|---|---|---|---|---|"]
    for r in metrics.sort_values(["task", "split", "metric"]).itertuples():
        ci = f"{r.ci_low:.3f}-{r.ci_high:.3f}" if pd.notna(getattr(r, "ci_low", None)) else ""
        n = "" if pd.isna(getattr(r, "n", None)) else int(r.n)
        lines.append(f"| {r.task} | {r.split} | {r.metric} | {r.value:.3f} | {ci} | {n} |")
    return "\n".join(lines)


def _data(summary: dict[str, Any]) -> str:
    if not summary:
        return "The run kept no data report."
    lines = [f"- {k.replace('_', ' ')}: {summary[k]}" for k in ("images_per_split", "patients_per_split",
                                                                  "labels_per_class") if k in summary]
    report = summary.get("data_report") or {}
    lines += [f"- {k}: {v}" for k, v in report.items() if not isinstance(v, list | dict)]
    return "\n".join(lines)


def _knee_check(info: dict[str, Any]) -> str:
    entry = info.get("knee_check") or {"method": "none"}
    rules = ("DICOM files whose Modality, BodyPartExamined or ViewPosition say they are no frontal knee radiograph, "
             "colour images, images under 64 px and flat images are refused before any model sees them.")
    if entry.get("method", "none") == "none":
        return ("No fitted knee check (" + entry.get("reason", "exported without one") + "): only the rules refuse "
                "images that are not knees. " + rules)
    views = ", ".join(f"{name} ({v['calibration_knees']} calibration knees)" for name, v in entry["views"].items())
    fitted_on = entry.get("fitted_on", "the training knees")
    return (f"Every knee is scored by a `{entry['method']}` knee check fitted on {fitted_on}: one Gaussian per "
            f"view ({views}), calibrated on held-out training patients. A knee "
            f"with `knee_score` below {entry['threshold']:g} is not graded (about {entry['alpha']:g} of knees like "
            f"the training ones). {rules}")


def model_card(info: dict[str, Any], metrics: pd.DataFrame, summary: dict[str, Any], *, notes: str = "") -> str:
    """Markdown model card from model.json's entries, the arm's metrics rows and the run's data report, with
    `notes` (provenance, attribution, how to rebuild) before the limits."""
    tasks = "\n".join(f"- `{t}` ({e['kind']}): classes {', '.join(e['classes'])}; decoding "
                      f"{e['decoding'].get('method', 'argmax')}" for t, e in info["tasks"].items())
    loc = info["localizer"]
    return f"""# {info['arm']} (kneeoa model package)

Knee radiograph osteoarthritis grading: a `{info['kind']}` arm exported from the study `{info['source']['study']}`
by kneeoa {info['kneeoa_version']}. Starting weights: {info['source']['weights'] or 'not recorded'}.

## Intended use

Research on knee osteoarthritis features in radiographs: reproducing and auditing the study's arms, and grading
research images in bulk (`kneeoa predict`) or one at a time (`kneeoa serve`). Not for clinical use.

## Tasks

{tasks}

## Input

DICOM films (bilateral PA or single knee) or knee crops (PNG, JPEG, DICOM). Films are localised with the
`{loc['name']}` localiser and cropped {loc['crop_mm']} mm square around each joint ({loc['crop_px']} px).

## Training data

{_data(summary)}

## Knee check

{_knee_check(info)}

## Metrics (validation and test splits of the run, patient-bootstrap 95% CIs)

{_metrics_table(metrics)}
{notes}
## Limits

{_LIMITS}
"""
