"""Phantom ground truth: KL grades drawn from a fixed mix, then OARSI grades drawn consistently with each KL grade.

Sampling order: the KL grade first (`KL_MIX`), then the OARSI site grades from the conditional table of that KL grade
(`KL_RULES`), so every binary task has mixed prevalence and every knee obeys the Kellgren-Lawrence definitions:

- KL0: no osteophyte, no narrowing, no sclerosis.
- KL1: doubtful narrowing and/or possible osteophytic lipping (at least one grade-1 sign, nothing above grade 1).
- KL2: definite osteophyte(s), possible narrowing (JSN <= 1), possible mild sclerosis.
- KL3: moderate multiple osteophytes, definite narrowing (JSN >= 1), some sclerosis.
- KL4: large osteophytes (>= 2), marked narrowing (JSN >= 2), severe sclerosis (>= 1), deformity (rendered).

Disease sits mainly in one "primary" compartment (medial in three knees of four, as in varus knee OA); the other
compartment is milder. `progress` moves a knee to its next visit: KL may step up one grade, and the new grades are
the element-wise maximum of the old ones and a fresh draw for the new KL grade, so no grade ever decreases and the
knee stays consistent with its KL grade (the tables' upper bounds never fall as KL rises).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from kneeoa.errors import ConfigError
from kneeoa.tasks import JSN_SITES, OSTEOPHYTE_SITES, RAW_GRADE_COLUMNS

#: Share of knees per KL grade 0-4 at baseline (close to the OAI baseline distribution).
KL_MIX = (0.40, 0.18, 0.26, 0.13, 0.03)

#: Probability that a knee's KL grade steps up by one between two visits, by current KL grade.
KL_STEP_UP = (0.10, 0.25, 0.20, 0.15, 0.0)

#: Share of patients whose disease sits mainly in the medial compartment.
MEDIAL_SHARE = 0.75

COMPARTMENTS = ("m", "l")


@dataclass(frozen=True)
class KneeGrades:
    """The ground truth of one knee image: KL grade 0-4 and the ten OARSI site grades 0-3.

    Sites: `os_*` osteophytes, `jsn_*` joint space narrowing, `sc_*` sclerosis; `f`/`t` femur/tibia,
    `m`/`l` medial/lateral compartment (the column names of `kneeoa.tasks.RAW_GRADE_COLUMNS`).
    """

    klg: int
    os_fm: int = 0
    os_fl: int = 0
    os_tm: int = 0
    os_tl: int = 0
    jsn_m: int = 0
    jsn_l: int = 0
    sc_fm: int = 0
    sc_fl: int = 0
    sc_tm: int = 0
    sc_tl: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.klg, int) and 0 <= self.klg <= 4):
            raise ConfigError(f"KneeGrades.klg must be an integer 0-4. Got {self.klg!r}.")
        for name in RAW_GRADE_COLUMNS:
            value = getattr(self, name)
            if not (isinstance(value, int) and 0 <= value <= 3):
                raise ConfigError(f"KneeGrades.{name} must be an integer 0-3 (an OARSI grade). Got {value!r}.")

    def as_dict(self) -> dict[str, int]:
        """`{"klg": ..., "os_fm": ..., ...}`: the manifest's label columns."""
        return dataclasses.asdict(self)

    def worst(self, sites: tuple[str, ...]) -> int:
        """The highest grade over `sites` (e.g. `OSTEOPHYTE_SITES`)."""
        return max(getattr(self, s) for s in sites)


@dataclass(frozen=True)
class KLRule:
    """The conditional table of OARSI grades for one KL grade; each field maps a grade (or count) to a probability.

    Attributes:
        os_max: the worst osteophyte grade of the knee (put on a site of the primary compartment).
        os_sites: how many of the four sites have an osteophyte, when `os_max` > 0.
        jsn_primary / jsn_other: JSN grade of the primary / other compartment (other is capped at primary).
        sc_tibia / sc_femur: sclerosis grade of the primary compartment's tibial / femoral site.
        sc_other: sclerosis grade of each site of the other compartment (capped at the primary tibial grade).
        needs_sign: redraw until the knee shows at least one osteophyte or narrowing (KL1's "doubtful" sign).
    """

    os_max: dict[int, float]
    os_sites: dict[int, float]
    jsn_primary: dict[int, float]
    jsn_other: dict[int, float]
    sc_tibia: dict[int, float]
    sc_femur: dict[int, float]
    sc_other: dict[int, float]
    needs_sign: bool = False


_NONE = {0: 1.0}

#: Conditional OARSI tables by KL grade (docs/phantom.md prints them).
KL_RULES: dict[int, KLRule] = {
    0: KLRule(_NONE, {1: 1.0}, _NONE, _NONE, _NONE, _NONE, _NONE),
    1: KLRule({0: 0.4, 1: 0.6}, {1: 1.0}, {0: 0.55, 1: 0.45}, _NONE, _NONE, _NONE, _NONE, needs_sign=True),
    2: KLRule({1: 0.6, 2: 0.4}, {1: 0.4, 2: 0.4, 3: 0.2}, {0: 0.5, 1: 0.5}, _NONE, {0: 0.75, 1: 0.25}, _NONE,
              _NONE),
    3: KLRule({1: 0.15, 2: 0.6, 3: 0.25}, {2: 0.4, 3: 0.35, 4: 0.25}, {1: 0.3, 2: 0.6, 3: 0.1}, {0: 0.8, 1: 0.2},
              {0: 0.2, 1: 0.5, 2: 0.3}, {0: 0.5, 1: 0.4, 2: 0.1}, {0: 0.85, 1: 0.15}),
    4: KLRule({2: 0.25, 3: 0.75}, {3: 0.4, 4: 0.6}, {2: 0.25, 3: 0.75}, {0: 0.5, 1: 0.35, 2: 0.15},
              {2: 0.4, 3: 0.6}, {1: 0.3, 2: 0.5, 3: 0.2}, {0: 0.5, 1: 0.4, 2: 0.1}),
}


def _draw(rng: np.random.Generator, table: dict[int, float]) -> int:
    keys = list(table)
    return int(keys[rng.choice(len(keys), p=np.asarray(list(table.values())) / sum(table.values()))])


def _check_rng(rng: object) -> None:
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(f"rng must be a numpy Generator (np.random.default_rng(seed)). Got {type(rng).__name__}.")


def _check_compartment(primary: str | None) -> None:
    if primary is not None and primary not in COMPARTMENTS:
        raise ConfigError(f"primary compartment must be 'm' (medial), 'l' (lateral) or None. Got {primary!r}.")


def _draw_once(rng: np.random.Generator, klg: int, primary: str) -> KneeGrades:
    rule = KL_RULES[klg]
    other = "l" if primary == "m" else "m"
    grades = dict.fromkeys(RAW_GRADE_COLUMNS, 0)
    os_max = _draw(rng, rule.os_max)
    if os_max:
        # The worst spur sits in the primary compartment; further sites fill that compartment first.
        lead, second = (f"os_t{primary}", f"os_f{primary}") if rng.random() < 0.5 else (f"os_f{primary}",
                                                                                         f"os_t{primary}")
        rest = [f"os_f{other}", f"os_t{other}"]
        rng.shuffle(rest)
        order = [lead, second, *rest]
        grades[lead] = os_max
        for site in order[1:_draw(rng, rule.os_sites)]:
            cap = os_max if site == second else max(1, os_max - 1)
            grades[site] = int(rng.integers(1, cap + 1))
    grades[f"jsn_{primary}"] = _draw(rng, rule.jsn_primary)
    grades[f"jsn_{other}"] = min(_draw(rng, rule.jsn_other), grades[f"jsn_{primary}"])
    grades[f"sc_t{primary}"] = _draw(rng, rule.sc_tibia)
    grades[f"sc_f{primary}"] = _draw(rng, rule.sc_femur)
    for site in (f"sc_t{other}", f"sc_f{other}"):
        grades[site] = min(_draw(rng, rule.sc_other), grades[f"sc_t{primary}"])
    return KneeGrades(klg=klg, **grades)


def _has_sign(g: KneeGrades) -> bool:
    return g.worst(OSTEOPHYTE_SITES) > 0 or g.worst(JSN_SITES) > 0


def sample_grades(rng: np.random.Generator, klg: int | None = None, *, primary: str | None = None) -> KneeGrades:
    """Draw one knee's grades: KL from `KL_MIX` (unless given), then OARSI grades from `KL_RULES[klg]`.

    Args:
        rng: the random generator (nothing global is used).
        klg: fix the KL grade (0-4) instead of drawing it.
        primary: the compartment the disease favours, "m" or "l"; None draws it (medial with `MEDIAL_SHARE`).

    Returns:
        KneeGrades consistent with the KL definitions (see the module docstring).

    Example:
        >>> g = sample_grades(np.random.default_rng(0), klg=0)
        >>> g.worst(OSTEOPHYTE_SITES), g.worst(JSN_SITES)
        (0, 0)
    """
    _check_rng(rng)
    _check_compartment(primary)
    if klg is None:
        klg = int(rng.choice(len(KL_MIX), p=KL_MIX))
    elif not (isinstance(klg, int | np.integer) and 0 <= klg <= 4):
        raise ConfigError(f"klg must be an integer 0-4 or None (draw from the mix). Got {klg!r}.")
    primary = primary or ("m" if rng.random() < MEDIAL_SHARE else "l")
    while True:
        grades = _draw_once(rng, int(klg), primary)
        if not KL_RULES[int(klg)].needs_sign or _has_sign(grades):
            return grades


def primary_compartment(grades: KneeGrades) -> str | None:
    """The compartment carrying more disease ("m" or "l"), or None when both carry the same (e.g. a KL0 knee)."""
    load = {c: sum(getattr(grades, s) for s in (f"os_f{c}", f"os_t{c}", f"jsn_{c}", f"sc_f{c}", f"sc_t{c}"))
            for c in COMPARTMENTS}
    if load["m"] == load["l"]:
        return None
    return "m" if load["m"] > load["l"] else "l"


def progress(grades: KneeGrades, rng: np.random.Generator, *, primary: str | None = None) -> KneeGrades:
    """The same knee at its next visit: KL steps up with probability `KL_STEP_UP[klg]`; no grade ever decreases.

    Args:
        grades: the knee at the current visit.
        rng: the random generator.
        primary: the compartment the disease favours; None keeps the one the grades show (or draws it).

    Returns:
        `grades` itself when KL does not step up, else the element-wise maximum of `grades` and a fresh
        `sample_grades(rng, klg + 1, primary=...)`.
    """
    _check_rng(rng)
    _check_compartment(primary)
    if rng.random() >= KL_STEP_UP[grades.klg]:
        return grades
    fresh = sample_grades(rng, grades.klg + 1, primary=primary or primary_compartment(grades))
    merged = {name: max(getattr(grades, name), getattr(fresh, name)) for name in RAW_GRADE_COLUMNS}
    return KneeGrades(klg=fresh.klg, **merged)

