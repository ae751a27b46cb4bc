"""The stats stage: confidence intervals, calibration and paired arm comparisons, from files in the run folder.

Reads RUN_DIR/metrics.csv (written by `evaluate`), RUN_DIR/predictions/*.parquet and the manifest (for patient ids);
writes, each atomically:

* RUN_DIR/metrics.csv: `ci_low`/`ci_high` filled for every row of a registered metric that has a prediction table
  (patient bootstrap, percentile interval), and rows `ece` and `brier` (with CIs) added per arm x task x split;
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

from kneeoa import stats
from kneeoa.calibration import calibration_metrics, reliability_table
from kneeoa.config import Config
from kneeoa.data.manifest import read_manifest
from kneeoa.errors import ManifestError
from kneeoa.io import write_text
from kneeoa.metrics import METRICS
from kneeoa.predictions import list_predictions, prob_columns, read_predictions
from kneeoa.tasks import get_task

METRICS_COLUMNS = ["arm", "task", "split", "metric", "value", "ci_low", "ci_high", "n"]
COMPARISON_COLUMNS = ["arm_a", "arm_b", "task", "metric", "difference", "ci_low", "ci_high", "p_value", "p_holm",
                      "method", "n_images", "n_patients", "split"]
CALIBRATION_METRICS = ("ece", "brier")


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    """Atomically write a CSV without the index."""
    return write_text(df.to_csv(index=False), path)


def read_metrics(run_dir: Path) -> pd.DataFrame:
    """RUN_DIR/metrics.csv with its contract columns checked."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist. Run `kneeoa evaluate {run_dir}` first: the stats stage adds "
                                "intervals to the metrics it writes.")
    df = pd.read_csv(path)
    missing = [c for c in METRICS_COLUMNS if c not in df]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {missing}; metrics.csv needs {METRICS_COLUMNS}. Re-run "
                            "`kneeoa evaluate`.")
    for col in ("ci_low", "ci_high", "value"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    return df


def replace_metric_rows(run_dir: Path, new_rows: pd.DataFrame, metrics: tuple[str, ...]) -> Path:
    """Atomically rewrite RUN_DIR/metrics.csv with rows of `metrics` for the (arm, task, split)s in `new_rows` replaced.

    Used by the explain stage for the CAM scores; the file is created with its header if it does not exist.
    """
    path = Path(run_dir) / "metrics.csv"
    old = read_metrics(run_dir) if path.exists() else pd.DataFrame(columns=METRICS_COLUMNS)

    def key(df: pd.DataFrame) -> pd.Series:
        return df["arm"].astype(str) + "|" + df["task"].astype(str) + "|" + df["split"].astype(str)

    hit = old["metric"].isin(metrics) & key(old).isin(set(key(new_rows)))
    keep = [df for df in (old[~hit], new_rows[METRICS_COLUMNS]) if len(df)]
    out = pd.concat(keep, ignore_index=True) if keep else pd.DataFrame(columns=METRICS_COLUMNS)
    return write_csv(out[METRICS_COLUMNS], path)


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


def _intervals(metrics: pd.DataFrame, tables, patient_of: pd.Series, cfg: Config) -> tuple[pd.DataFrame, list]:
    """Fill CIs of registered metrics; return the updated table and the calibration rows / reliability tables."""
    metrics = metrics.copy()
    calib = calibration_metrics(cfg.stats.calibration_bins)
    new_rows, reliability = [], []
    for (arm, task), table in sorted(tables.items()):
        k = get_task(task).n_classes
        for split, part in table.groupby("split", sort=True):
            y, probs = part["y_true"].to_numpy(), part[prob_columns(k)].to_numpy()
            codes, n_pat = stats.patient_codes(_patients(part, patient_of, f"predictions/{arm}__{task}"))
            w = stats.bootstrap_weights(codes, n_pat, cfg.stats.n_boot, _rng(cfg.stats.seed, task, str(split)))
            rows = (metrics["arm"] == arm) & (metrics["task"] == task) & (metrics["split"] == split)
            for i in metrics.index[rows & metrics["metric"].isin(METRICS.names())]:
                name = metrics.at[i, "metric"]
                ci = stats.bootstrap_ci(y, probs, w, point=METRICS.get(name).fn, weighted=stats.weighted_metric(name),
                                        confidence=cfg.stats.confidence, pred=part["y_pred"].to_numpy())
                metrics.loc[i, ["ci_low", "ci_high"]] = [ci.low, ci.high]
            for name, (point, weighted) in calib.items():
                ci = stats.bootstrap_ci(y, probs, w, point=point, weighted=weighted, confidence=cfg.stats.confidence)
                new_rows.append({"arm": arm, "task": task, "split": split, "metric": name, "value": ci.value,
                                 "ci_low": ci.low, "ci_high": ci.high, "n": len(y)})
            rel = reliability_table(y, probs, n_bins=cfg.stats.calibration_bins)
            reliability.append(rel.assign(arm=arm, task=task, split=split))
    metrics = metrics[~metrics["metric"].isin(CALIBRATION_METRICS)]
    if new_rows:
        metrics = pd.concat([metrics, pd.DataFrame(new_rows)], ignore_index=True)
    return metrics[METRICS_COLUMNS], reliability


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
            codes, n_pat = stats.patient_codes(pid)
            w = stats.bootstrap_weights(codes, n_pat, cfg.stats.n_boot, _rng(cfg.stats.seed, "compare", task, split))
            for metric in cfg.stats.compare_metrics.get(kind, []):
                if metric == "auc" and k == 2:
                    if len(np.unique(y)) < 2:
                        continue
                    res = stats.delong_test(y, pa[:, 1], pb[:, 1], groups=pid, confidence=cfg.stats.confidence)
                else:
                    res = stats.paired_bootstrap(y, pa, pb, w, point=METRICS.get(metric).fn,
                                                 weighted=stats.weighted_metric(metric),
                                                 confidence=cfg.stats.confidence, pred_a=a["y_pred"].to_numpy(),
                                                 pred_b=b["y_pred"].to_numpy())
                rows.append({"arm_a": arm_a, "arm_b": arm_b, "task": task, "metric": metric,
                             "difference": res.difference, "ci_low": res.low, "ci_high": res.high,
                             "p_value": res.p_value, "method": res.method, "n_images": len(y), "n_patients": n_pat,
                             "split": split})
    out = pd.DataFrame(rows, columns=[c for c in COMPARISON_COLUMNS if c != "p_holm"])
    out.insert(COMPARISON_COLUMNS.index("p_holm"), "p_holm", stats.holm(out["p_value"].to_numpy(dtype=float)))
    return out[COMPARISON_COLUMNS]


def roc_bands(tables, patient_of: pd.Series, cfg: Config) -> pd.DataFrame:
    """ROC curve with a pointwise patient-bootstrap band per binary arm x task on `stats.compare_split`."""
    split = cfg.stats.compare_split
    parts = []
    for (arm, task), table in sorted(tables.items()):
        part = table[table["split"] == split]
        if get_task(task).n_classes != 2 or part["y_true"].nunique() < 2:
            continue
        codes, n_pat = stats.patient_codes(_patients(part, patient_of, f"predictions/{arm}__{task}"))
        w = stats.bootstrap_weights(codes, n_pat, cfg.stats.n_boot, _rng(cfg.stats.seed, task, split))
        band = stats.roc_band(part["y_true"].to_numpy() == 1, part["prob_1"].to_numpy(), w,
                              confidence=cfg.stats.confidence)
        parts.append(pd.DataFrame(band).assign(arm=arm, task=task, split=split))
    cols = ["arm", "task", "split", "fpr", "tpr", "tpr_low", "tpr_high"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def run(run_dir: Path, cfg: Config) -> None:
    """Add CIs and calibration to metrics.csv; write comparisons.csv, reliability.csv and roc_bands.csv."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    manifest = read_manifest(run_dir)
    patient_of = pd.Series(manifest["patient_id"].to_numpy(), index=manifest["image_id"])
    tables = _load_tables(run_dir)
    metrics, reliability = _intervals(metrics, tables, patient_of, cfg)
    rel_cols = ["arm", "task", "split", "bin", "bin_low", "bin_high", "n", "confidence", "observed"]
    rel = pd.concat(reliability, ignore_index=True)[rel_cols] if reliability else pd.DataFrame(columns=rel_cols)
    comparisons = compare_arms(tables, patient_of, cfg)
    bands = roc_bands(tables, patient_of, cfg)
    write_csv(rel, run_dir / "reliability.csv")
    write_csv(bands, run_dir / "roc_bands.csv")
    write_csv(comparisons, run_dir / "comparisons.csv")
    write_csv(metrics, run_dir / "metrics.csv")
