"""The study's targets as data: which source grades feed each task, how they are binarised, which metrics apply.

The paper reports three binary features (osteophytes, joint space narrowing, subchondral sclerosis) derived from
OARSI atlas grades, and the Kellgren-Lawrence grade (KLG 0-4). It does not say how the OARSI grades were binarised;
we default to "present if any site has grade >= 1" (`threshold=1`), the usual OAI convention for "any feature",
and make the threshold a config option (`tasks.thresholds`). Graded variants (`*_grade`, the maximum 0-3 grade over
sites) are registered too.

A task whose source columns are absent from a manifest is simply not available for that dataset (kneeKL224 has
KL grades only): labels are never invented.

Adding a task is one `Task` entry: `TASKS.add` here, or an entry point of group `kneeoa.tasks` in another
distribution (`kneeoa.registry`); config checks, training, metrics and the report read the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from kneeoa.errors import ConfigError
from kneeoa.registry import Registry

#: Raw OARSI grade columns of the manifest, 0-3 each (OAI variable in brackets).
OSTEOPHYTE_SITES = ("os_fm", "os_fl", "os_tm", "os_tl")  # XROSFM, XROSFL, XROSTM, XROSTL
JSN_SITES = ("jsn_m", "jsn_l")  # XRJSM, XRJSL
SCLEROSIS_SITES = ("sc_fm", "sc_fl", "sc_tm", "sc_tl")  # XRSCFM, XRSCFL, XRSCTM, XRSCTL
RAW_GRADE_COLUMNS = OSTEOPHYTE_SITES + JSN_SITES + SCLEROSIS_SITES


#: The paper's headline metric per task kind (model selection and the report's main table use it).
HEADLINE_METRIC = {"ordinal": "kappa_quadratic", "binary": "auc"}


@dataclass(frozen=True)
class Task:
    """One prediction target.

    Attributes:
        name: column name in the manifest and the `<task>` part of prediction-table file names.
        kind: "binary", "ordinal" (KLG, graded variants) -- decides the metric family.
        classes: class names, index = label value.
        sources: raw manifest columns the label is derived from (empty: the label column itself is the source).
        reduce: "max" over sites (graded) or "any" over sites at `threshold` (binary).
        threshold: default binarisation threshold for "any" tasks.
        headline: the metric the paper reports for it, which also selects the CNN epoch (a `kneeoa.stats.metrics` name;
            empty: the kind's, `HEADLINE_METRIC`).
        masks: the phantom mask arrays (RUN_DIR/masks/<image_id>.npz keys) whose union is the task's feature, for
            scoring where Grad-CAM looks; empty: the task is not scored.
        primary: the study's main grade (KLG): listed first in data tables, the one a grader's page shows its map
            for (see `primary_task`).
        learned: False for a task no arm learns from labels (the zero-shot anatomy QC, whose every row is a knee):
            the heads, fusion and the confusion matrices leave it out (see `learned_tasks`).
    """

    name: str
    kind: str
    classes: tuple[str, ...]
    sources: tuple[str, ...] = ()
    reduce: str = "max"
    threshold: int = 1
    headline: str = ""
    masks: tuple[str, ...] = ()
    primary: bool = False
    learned: bool = True

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def headline_metric(self) -> str:
        """The paper's metric for this task: `headline`, else quadratic-weighted kappa for ordinal grades and ROC AUC
        for binary ones."""
        return self.headline or HEADLINE_METRIC[self.kind]

    @property
    def binarised(self) -> bool:
        """A binary feature read as "any site at `threshold` or above": `tasks.thresholds` can set its threshold."""
        return self.reduce == "any" and bool(self.sources)

    def derive(self, df: pd.DataFrame, *, threshold: int | None = None) -> pd.Series | None:
        """Label column for this task from `df`'s source columns, or None when the sources are absent.

        A row whose source grades are all missing gets a missing label (pd.NA), never 0. Sites that are missing
        while others are read count as "not present" only when another site already decides the label.
        """
        if not self.sources:
            return df[self.name].astype("Int64") if self.name in df else None
        present = [c for c in self.sources if c in df]
        if not present:
            return None
        grades = df[present].apply(pd.to_numeric, errors="coerce").astype("float64")
        all_missing = grades.isna().all(axis=1)
        worst = grades.max(axis=1, skipna=True)
        if self.reduce == "any":
            t = self.threshold if threshold is None else threshold
            label = (worst >= t).astype("float64")
            # A row with a missing site and no positive site is undecided: the missing site could be positive.
            undecided = grades.isna().any(axis=1) & (label == 0)
            label[undecided] = np.nan
        else:
            label = worst
        label[all_missing] = np.nan
        return label.round().astype("Int64")


TASKS: Registry[Task] = Registry("task", group="kneeoa.tasks", entry_type=Task)
# KLG is scored against the union of the three feature masks: KL grades are defined by osteophytes and joint-space
# narrowing, and the whole-joint mask (`joint`) would reward a map for merely looking at the knee.
TASKS.add("klg", Task("klg", "ordinal", ("KL0", "KL1", "KL2", "KL3", "KL4"), masks=("osteophytes", "jsn", "sclerosis"),
                      primary=True))
TASKS.add("osteophytes", Task("osteophytes", "binary", ("absent", "present"), OSTEOPHYTE_SITES, "any",
                              masks=("osteophytes",)))
TASKS.add("jsn", Task("jsn", "binary", ("absent", "present"), JSN_SITES, "any", masks=("jsn",)))
TASKS.add("sclerosis", Task("sclerosis", "binary", ("absent", "present"), SCLEROSIS_SITES, "any", masks=("sclerosis",)))
TASKS.add("osteophytes_grade", Task("osteophytes_grade", "ordinal", ("0", "1", "2", "3"), OSTEOPHYTE_SITES, "max"))
TASKS.add("jsn_grade", Task("jsn_grade", "ordinal", ("0", "1", "2", "3"), JSN_SITES, "max"))
TASKS.add("sclerosis_grade", Task("sclerosis_grade", "ordinal", ("0", "1", "2", "3"), SCLEROSIS_SITES, "max"))
# Zero-shot anatomy QC ("is this a knee radiograph?"): every manifest image is a knee, so y_true is 1.
TASKS.add("knee_id", Task("knee_id", "binary", ("not knee", "knee"), learned=False))


def get_task(name: str) -> Task:
    return TASKS.get(name)


def primary_task() -> str:
    """The study's main grade: the first registered task flagged `primary` (KLG)."""
    return next(name for name, task in TASKS.items() if task.primary)


def learned_tasks(names: list[str]) -> list[str]:
    """`names` without the tasks no arm learns from labels (`Task.learned` False), in order."""
    return [name for name in names if TASKS.get(name).learned]


def binarised_tasks() -> list[str]:
    """The tasks whose threshold `tasks.thresholds` may set (see `Task.binarised`)."""
    return [name for name, task in TASKS.items() if task.binarised]


def add_task_labels(df: pd.DataFrame, thresholds: dict[str, int] | None = None) -> pd.DataFrame:
    """Return `df` with a label column for every task whose sources it has (raw grades -> task labels).

    Args:
        df: a manifest-like table with raw grade columns (any subset of RAW_GRADE_COLUMNS) and/or `klg`.
        thresholds: per binary task, the minimum OARSI grade that counts as "present" (default 1).
    """
    thresholds = thresholds or {}
    for name in thresholds:
        task = TASKS.get(name)
        if not task.binarised:
            raise ConfigError(f"tasks.thresholds names '{name}', which is not a binarised task; use one of "
                              f"{', '.join(binarised_tasks())}.")
        if thresholds[name] not in (1, 2, 3):
            raise ConfigError(f"The threshold of task '{name}' must be 1, 2 or 3 (an OARSI grade). "
                              f"Got {thresholds[name]!r}.")
    out = df.copy()
    for name, task in TASKS.items():
        if not task.sources:
            continue
        label = task.derive(out, threshold=thresholds.get(name))
        if label is not None:
            out[name] = label
    return out


def available_tasks(df: pd.DataFrame, wanted: list[str]) -> list[str]:
    """The tasks of `wanted` for which `df` has at least one label."""
    return [t for t in wanted if t in df and df[t].notna().any()]
