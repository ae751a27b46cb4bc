"""The learned half of the knee check: how far an image lies from the knees a grader was trained on.

Two views of a crop are each fitted with one Gaussian (mean and Ledoit-Wolf shrunk covariance) over the grader's
training knees, and an image is scored by its Mahalanobis distance in each:

- **layout**: the crop in right-knee orientation reduced to `THUMB` x `THUMB` pixels and standardised (zero mean,
  unit spread): where bone, joint space and soft tissue lie. Coarse on purpose: at 12 px the knees' layout is
  tight enough that a whole chest film lies outside it, where 16 px and finer leave room for chests (a check keeps
  the side it was fitted with: `KneeCheck.thumb`). It is fitted on the training crops and on `FILM_COPIES` copies
  of each made film-like (`film_like`: rotated, rescaled, shifted, re-exposed, blurred, noisy as crops re-cut from
  films are), so that knees localised on real films are not refused for framing or exposure.
- **features**: the grader's own features (a CNN's pooled backbone output, an encoder's embedding) of the crop
  after histogram equalisation, which takes gain, offset and gamma out: what the grader itself sees of the knee.

Nothing but knees is used to fit either, so neither has any idea of "chest" or "hand": whatever lies far from the
training knees is refused, including kinds of image no one thought of. Thresholds are set on knees too: the training
patients are split, the Gaussians are fitted on one part (`FIT_SHARE`) and the distances of the other part
calibrate each view's tail share (the share of held-out knees lying at least as far out).

`knee_score` is the smaller of the two tail shares: about 0.5 for a typical knee, 0 for anything further out than
every calibration knee in some view. An image whose `knee_score` is below `threshold` (alpha / 2: each view may
refuse alpha / 2 of knees like the training ones, so about alpha of them in all) is not graded.

A check is one `KNEE_CHECKS` entry: a class with `describe`, `fit`, `scores`, `state()` (arrays to save) and
`from_state(arrays, meta)`. Model packages store the fitted state as `knee_check.safetensors` and its settings in
model.json (`kneeoa.deploy.package`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kneeoa.registry import Registry

#: Default share of knees like the training ones that the check may refuse.
DEFAULT_ALPHA = 0.005
#: Share of the training patients the Gaussians are fitted on; the rest calibrate the scores.
FIT_SHARE = 0.8
#: Side of the layout thumbnail, pixels, for checks fitted now (packages fitted with 16 px keep 16).
THUMB = 12
#: Film-like copies of each training crop the layout view is fitted and calibrated on.
FILM_COPIES = 2

KNEE_CHECKS: Registry[type] = Registry("knee check")

Features = Callable[[list[np.ndarray], list[str]], np.ndarray]


def right_knees(crops: list[np.ndarray], sides: list[str]) -> list[np.ndarray]:
    """Crops in right-knee orientation (left knees mirrored), the orientation every layout is taken in."""
    return [np.asarray(c)[:, ::-1] if s == "L" else np.asarray(c) for c, s in zip(crops, sides, strict=True)]


def layout(crop: np.ndarray, thumb: int = THUMB) -> np.ndarray:
    """(thumb * thumb,) the crop reduced to thumb x thumb (area average) and standardised."""
    import cv2

    t = cv2.resize(np.asarray(crop, dtype=np.float32), (thumb, thumb), interpolation=cv2.INTER_AREA).astype(np.float64)
    return ((t - t.mean()) / (t.std() + 1e-3)).ravel()


def equalised(crop: np.ndarray) -> np.ndarray:
    """The crop with its grey levels replaced by their rank (histogram equalisation, ties sharing one level)."""
    img = np.asarray(crop, dtype=np.float32)
    levels, inverse, counts = np.unique(img.ravel(), return_inverse=True, return_counts=True)
    rank = (np.cumsum(counts) - (counts + 1) / 2) / max(1, img.size - 1)
    return rank[inverse].reshape(img.shape).astype(np.float32)


def film_like(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of a crop as a crop re-cut from a film looks: rotated up to 10 degrees, rescaled 0.93-1.08, shifted up
    to 4 %, re-exposed (offset, gain, gamma), sometimes blurred, with noise (the ranges of `kneeoa crop-films`)."""
    import cv2

    img = np.asarray(crop, dtype=np.float32)
    h, w = img.shape
    centre = (w / 2 + rng.uniform(-0.04, 0.04) * w, h / 2 + rng.uniform(-0.04, 0.04) * h)
    warp = cv2.getRotationMatrix2D(centre, rng.uniform(-10, 10), rng.uniform(0.93, 1.08))
    out = cv2.warpAffine(img, warp, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    out = rng.uniform(0, 0.15) + rng.uniform(0.7, 1.1) * np.clip(out, 0, 1) ** rng.uniform(0.6, 1.6)
    if rng.random() < 0.5:
        out = cv2.GaussianBlur(out.astype(np.float32), (0, 0), rng.uniform(0.3, 1.2))
    return np.clip(out + rng.normal(0, rng.uniform(0, 0.02), out.shape), 0, 1).astype(np.float32)


@dataclass
class GaussianView:
    """One Gaussian over one view's vectors, and the sorted squared distances of the calibration knees.

    `sqrt`: take the signed square root of each value first (pooled ReLU features are skewed with a mass at zero).
    """

    mean: np.ndarray
    precision: np.ndarray
    calibration: np.ndarray
    sqrt: bool

    @classmethod
    def fit(cls, x: np.ndarray, calibrate: np.ndarray, *, sqrt: bool) -> GaussianView:
        """Fit on the rows of `x` not in `calibrate` (a boolean mask); calibrate on those that are."""
        from sklearn.covariance import LedoitWolf

        lw = LedoitWolf().fit(cls._prepare(x, sqrt)[~calibrate])
        view = cls(lw.location_.astype(np.float64), lw.precision_.astype(np.float64), np.zeros(0), sqrt)
        view.calibration = np.sort(view.distances(x[calibrate]))
        return view

    @staticmethod
    def _prepare(x: np.ndarray, sqrt: bool) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return np.sign(x) * np.sqrt(np.abs(x)) if sqrt else x

    def distances(self, x: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distances (n,) to the training knees."""
        d = self._prepare(x, self.sqrt) - self.mean
        return np.einsum("ij,jk,ik->i", d, self.precision, d)

    def tail(self, x: np.ndarray) -> np.ndarray:
        """(n,) the share of calibration knees at least as far out as each row."""
        beyond = len(self.calibration) - np.searchsorted(self.calibration, self.distances(x), side="left")
        return beyond / max(1, len(self.calibration))


@dataclass
class KneeCheck:
    """The two-view knee check (see the module docstring).

    Attributes:
        views: view name ("layout", "features") -> its fitted Gaussian.
        alpha: share of knees like the training ones the check may refuse, split equally between the views.
    """

    views: dict[str, GaussianView]
    alpha: float = DEFAULT_ALPHA

    name = "layout_features"

    @property
    def threshold(self) -> float:
        """knee_score below which an image is refused."""
        return self.alpha / len(self.views)

    @property
    def thumb(self) -> int:
        """Side of the layout thumbnail this check was fitted with (read from the layout view's size)."""
        return math.isqrt(self.views["layout"].mean.shape[0])

    @staticmethod
    def describe(crops: list[np.ndarray], sides: list[str], features: Features, *, thumb: int = THUMB
                 ) -> dict[str, np.ndarray]:
        """Each view's vectors of float crops in radiographic orientation: the layout of a left knee is taken mirrored
        (every layout in right-knee orientation); `features` orients crops itself."""
        layouts = [layout(c, thumb) for c in right_knees(crops, sides)]
        return {"layout": np.stack(layouts) if crops else np.zeros((0, thumb * thumb)),
                "features": features([equalised(c) for c in crops], sides)}

    @classmethod
    def fit(cls, described: dict[str, np.ndarray], groups: np.ndarray, *, film_layouts: np.ndarray | None = None,
            film_groups: np.ndarray | None = None, alpha: float = DEFAULT_ALPHA, seed: int = 0) -> KneeCheck:
        """Fit on the training knees' views, split by patient (`groups`) into fit and calibration parts.

        Args:
            described: `describe` of the training crops.
            groups: (n,) patient of each crop.
            film_layouts, film_groups: layouts of film-like copies of training crops (`film_like`) and their
                patients; they join the layout view's fit and calibration parts with their patients.
            alpha: see the class; each view needs at least 2 / alpha calibration knees.

        Raises:
            ValueError: fewer than 10 knees or 4 patients, or too few calibration knees for `alpha`.
        """
        groups = np.asarray(groups).astype(str)
        patients = np.unique(groups)
        n = len(groups)
        if n < 10 or len(patients) < 4:
            raise ValueError(f"a knee check needs at least 10 training knees of 4 patients; got {n} knees of "
                             f"{len(patients)} patients")
        rng = np.random.default_rng(seed)
        held = rng.choice(patients, size=max(1, round(len(patients) * (1 - FIT_SHARE))), replace=False)
        calibrate = np.isin(groups, held)
        per_view = alpha / 2
        if calibrate.sum() * per_view < 1:
            raise ValueError(f"{int(calibrate.sum())} calibration knees are too few to set a threshold refusing "
                             f"{alpha:g} of knees (at least {int(np.ceil(1 / per_view))} are needed); train on more "
                             "knees or export with a larger knee-check alpha")
        layouts, layout_groups = described["layout"], groups
        if film_layouts is not None and len(film_layouts):
            layouts = np.concatenate([layouts, film_layouts])
            layout_groups = np.concatenate([groups, np.asarray(film_groups).astype(str)])
        views = {"layout": GaussianView.fit(layouts, np.isin(layout_groups, held), sqrt=False),
                 "features": GaussianView.fit(described["features"], calibrate, sqrt=True)}
        return cls(views, float(alpha))

    def view_scores(self, described: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each view's tail share (n,) of already described crops."""
        return {name: view.tail(described[name]) for name, view in self.views.items()}

    def scores(self, crops: list[np.ndarray], sides: list[str], features: Features) -> np.ndarray:
        """knee_score (n,) in [0, 1]: the smaller tail share of the two views."""
        if not crops:
            return np.zeros(0)
        described = self.describe(crops, sides, features, thumb=self.thumb)
        return np.min(np.stack(list(self.view_scores(described).values())), axis=0)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays to save as safetensors, JSON settings)."""
        arrays = {f"{name}.{part}": getattr(view, part) for name, view in self.views.items()
                  for part in ("mean", "precision", "calibration")}
        return arrays, {"method": self.name, "alpha": self.alpha, "threshold": self.threshold, "thumb": self.thumb,
                        "views": {name: {"dim": int(v.mean.shape[0]), "calibration_knees": int(len(v.calibration)),
                                         "sqrt": v.sqrt} for name, v in self.views.items()}}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> KneeCheck:
        views = {name: GaussianView(*(np.asarray(arrays[f"{name}.{part}"], np.float64)
                                      for part in ("mean", "precision", "calibration")), bool(info["sqrt"]))
                 for name, info in meta["views"].items()}
        return cls(views, float(meta.get("alpha", DEFAULT_ALPHA)))


KNEE_CHECKS.add("layout_features", KneeCheck)
