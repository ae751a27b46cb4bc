"""The stats stage: confidence intervals, calibration and paired arm comparisons, from files in the run folder.

Reads RUN_DIR/predictions/*.parquet and the manifest (for patient ids); writes, each atomically:

* its metrics part RUN_DIR/metrics/stats.csv: every registered metric of every prediction table on the evaluated
  splits (val, test) with a patient-bootstrap percentile CI, and rows `ece` and `brier` (with CIs) on every split;
  the merged metrics.csv puts these CIs beside the values `evaluate` wrote (`kneeoa.runfolder.metrics`);
* RUN_DIR/comparisons.csv: every pair of arms on every task, on `stats.compare_split` (images both arms scored),
  with Holm-adjusted p-values over the whole file (one family);
* RUN_DIR/reliability.csv: reliability-diagram bins per arm x task x split;
* RUN_DIR/roc_bands.csv: ROC curves with patient-bootstrap bands for binary tasks on `stats.compare_split`.

Resamples are seeded from `stats.seed` and the task and split only, so every arm scored on the same images gets the
same resamples, and re-running gives the same numbers.
"""

from __future__ import annotations

import itertools
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from kneeoa.config import Config
from kneeoa.errors import ManifestError
from kneeoa.runfolder.manifest import read_manifest
from kneeoa.runfolder.metrics import COLUMNS, EVAL_SPLITS, write_metrics_part
from kneeoa.runfolder.predictions import list_predictions, prob_columns, read_predictions
from kneeoa.runfolder.tables import columns, write_table
from kneeoa.stats import bootstrap
from kneeoa.stats.calibration import calibration_metrics, reliability_table
from kneeoa.stats.comparisons import delong_test, holm
from kneeoa.stats.metrics import METRICS, metrics_for
from kneeoa.tasks import get_task


def _rng(seed: int, *key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32("|".join(key).encode())])


def _patients(table: pd.DataFrame, patient_of: pd.Series, origin: str) -> np.ndarray:
    pid = table["image_id"].map(patient_of)
    if pid.isna().any():
        bad = table["image_id"][pid.isna()].iloc[0]
        raise ManifestError(f"{origin}: image_id {bad!r} is not in the manifest ({int(pid.isna().sum())} image(s) in "
                            "all). Prediction tables must come from this run's manifest; re-run the arm.")
    return pid.to_numpy()


def _load_tables(run_dir: Path) -> dict[tuple[str, str], pd.DataFrame]:
    out = {}
    for path in list_predictions(run_dir):
        arm, task, df = read_predictions(path)
        out[arm, task] = df
    return out


def _intervals(tables, patient_of: pd.Series, cfg: Config) -> tuple[pd.DataFrame, list]:
    """Point value and patient-bootstrap CI of every registered metric and of calibration, per arm x task x split;
    and the reliability tables."""
    calib = calibration_metrics(cfg.stats.calibration_bins)
    rows, reliability = [], []
    for (arm, task), table in sorted(tables.items()):
        k = get_task(task).n_classes
        for split, part in table.groupby("split", sort=True):
            y, probs, pred = part["y_true"].to_numpy(), part[prob_columns(k)].to_numpy(), part["y_pred"].to_numpy()
            codes, n_pat = bootstrap.patient_codes(_patients(part, patient_of, f"predictions/{arm}__{task}"))
            w = bootstrap.bootstrap_weights(codes, n_pat, cfg.stats.n_boot, _rng(cfg.stats.seed, task, str(split)))
            point_metrics = metrics_for(get_task(task)) if split in EVAL_SPLITS else []
            scored = [(m.name, m.fn, m.weighted_fn, pred) for m in point_metrics]
            scored += [(name, point, weighted, None) for name, (point, weighted) in calib.items()]
            for name, point, weighted, hard in scored:
                ci = bootstrap.bootstrap_ci(y, probs, w, point=point, weighted=weighted,
                                            confidence=cfg.stats.confidence, pred=hard)
                rows.append({"arm": arm, "task": task, "split": split, "metric": name, "value": ci.value,
                             "ci_low": ci.low, "ci_high": ci.high, "n": len(y)})
            rel = reliability_table(y, probs, n_bins=cfg.stats.calibration_bins)
            reliability.append(rel.assign(arm=arm, task=task, split=split))
    return pd.DataFrame(rows, columns=COLUMNS), reliability


def compare_arms(tables, patient_of: pd.Series, cfg: Config) -> pd.DataFrame:
    """Every pair of arms per task on `stats.compare_split`, on the images both scored; Holm over all rows."""
    split = cfg.stats.compare_split
    rows = []
    tasks = sorted({task for _, task in tables})
    for task in tasks:
        kind = get_task(task).kind
        arms = sorted(arm for arm, t in tables if t == task)
        k = get_task(task).n_classes
        for arm_a, arm_b in itertools.combinations(arms, 2):
            a = tables[arm_a, task].query("split == @split").set_index("image_id")
            b = tables[arm_b, task].query("split == @split").set_index("image_id")
            common = a.index.intersection(b.index).sort_values()
            if len(common) == 0:
                continue
            a, b = a.loc[common], b.loc[common]
            if not (a["y_true"].to_numpy() == b["y_true"].to_numpy()).all():
                image = common[np.flatnonzero(a["y_true"].to_numpy() != b["y_true"].to_numpy())[0]]
                raise ManifestError(f"predictions/{arm_a}__{task} and predictions/{arm_b}__{task} disagree on y_true "
                                    f"for image {image!r}; both must be labelled from the same manifest.")
            y, pa, pb = a["y_true"].to_numpy(), a[prob_columns(k)].to_numpy(), b[prob_columns(k)].to_numpy()
            pid = _patients(a.reset_index(), patient_of, f"predictions/{arm_a}__{task}")
            codes, n_pat = bootstrap.patient_codes(pid)
            w = bootstrap.bootstrap_weights(codes, n_pat, cfg.stats.n_boot,
                                            _rng(cfg.stats.seed, "compare", task, split))
            for metric in cfg.stats.compare_metrics.get(kind, []):
                if metric == "auc" and k == 2:
                    if len(np.unique(y)) < 2:
                        continue
                    res = delong_test(y, pa[:, 1], pb[:, 1], groups=pid, confidence=cfg.stats.confidence)
                else:
                    res = bootstrap.paired_bootstrap(y, pa, pb, w, point=METRICS.get(metric).fn,
                                                     weighted=METRICS.get(metric).weighted_fn,
                                                 confidence=cfg.stats.confidence, pred_a=a["y_pred"].to_numpy(),
                                                 pred_b=b["y_pred"].to_numpy())
                rows.append({"arm_a": arm_a, "arm_b": arm_b, "task": task, "metric": metric,
                             "difference": res.difference, "ci_low": res.low, "ci_high": res.high,
                             "p_value": res.p_value, "method": res.method, "n_images": len(y), "n_patients": n_pat,
                             "split": split})
    cols = columns("comparisons.csv")
    out = pd.DataFrame(rows, columns=[c for c in cols if c != "p_holm"])
    out.insert(cols.index("p_holm"), "p_holm", holm(out["p_value"].to_numpy(dtype=float)))
    return out[cols]


def roc_bands(tables, patient_of: pd.Series, cfg: Config) -> pd.DataFrame:
    """ROC curve with a pointwise patient-bootstrap band per binary arm x task on `stats.compare_split`."""
    split = cfg.stats.compare_split
    parts = []
    for (arm, task), table in sorted(tables.items()):
        part = table[table["split"] == split]
        if get_task(task).n_classes != 2 or part["y_true"].nunique() < 2:
            continue
        codes, n_pat = bootstrap.patient_codes(_patients(part, patient_of, f"predictions/{arm}__{task}"))
        w = bootstrap.bootstrap_weights(codes, n_pat, cfg.stats.n_boot, _rng(cfg.stats.seed, task, split))
        band = bootstrap.roc_band(part["y_true"].to_numpy() == 1, part["prob_1"].to_numpy(), w,
                              confidence=cfg.stats.confidence)
        parts.append(pd.DataFrame(band).assign(arm=arm, task=task, split=split))
    cols = columns("roc_bands.csv")
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def run(run_dir: Path, cfg: Config) -> None:
    """Write the stats metrics part (CIs, calibration), comparisons.csv, reliability.csv and roc_bands.csv."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    patient_of = pd.Series(manifest["patient_id"].to_numpy(), index=manifest["image_id"])
    tables = _load_tables(run_dir)
    metrics, reliability = _intervals(tables, patient_of, cfg)
    rel_cols = columns("reliability.csv")
    rel = pd.concat(reliability, ignore_index=True)[rel_cols] if reliability else pd.DataFrame(columns=rel_cols)
    comparisons = compare_arms(tables, patient_of, cfg)
    bands = roc_bands(tables, patient_of, cfg)
    write_table(rel, run_dir, "reliability.csv")
    write_table(bands, run_dir, "roc_bands.csv")
    write_table(comparisons, run_dir, "comparisons.csv")
    write_metrics_part(metrics, run_dir, "stats")
