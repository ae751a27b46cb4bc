"""The Python face of a grader, for notebooks and scripts: the same predictor the CLI and the web page use.

    import kneeoa
    grader = kneeoa.load_model()                  # the built-in grader; or a built-in's name, or a package folder
    table = grader.predict(["film.dcm", "knee.png"])
    maps = grader.explain(["knee.png"])           # Grad-CAM maps as arrays

`Grader.predict` returns exactly `kneeoa predict`'s predictions.csv table (same columns, same values for the same
files); numpy crops are graded as the crop files the CLI would be given.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kneeoa.deploy.inputs import InputFile

Input = str | Path | np.ndarray | InputFile


class Grader:
    """A loaded model package: grades knee radiographs, checks that they are knees, explains its grades.

    Attributes:
        model_dir: the package folder (a built-in's folder inside kneeoa, or an exported package).
        info: the package's model.json (tasks, classes, decoding, localiser, knee check).
        card: the package's model card (Markdown).
    """

    def __init__(self, model: Any, model_dir: Path) -> None:
        self._model, self.model_dir = model, Path(model_dir)
        self.info: dict[str, Any] = model.info
        card = self.model_dir / "README.md"
        self.card = card.read_text(encoding="utf-8") if card.exists() else ""

    @property
    def tasks(self) -> list[str]:
        """The tasks this grader predicts (e.g. ["klg"])."""
        return list(self.info["tasks"])

    def __repr__(self) -> str:
        return f"Grader({self.info['arm']!r}, tasks={self.tasks}, from {str(self.model_dir)!r})"

    @contextmanager
    def _files(self, inputs: Input | Iterable[Input], side: str | None, kind: str | None):
        """The inputs as `InputFile`s; numpy crops are written as 16-bit PNG crops into a temporary folder."""
        from kneeoa.deploy.inputs import collect_inputs
        from kneeoa.formats.images import save_gray16

        if isinstance(inputs, str | Path | np.ndarray | InputFile):
            inputs = [inputs]
        with tempfile.TemporaryDirectory(prefix="kneeoa-api-") as tmp:
            items: list[InputFile] = []
            for i, x in enumerate(inputs):
                if isinstance(x, InputFile):
                    items.append(x)
                elif isinstance(x, np.ndarray):
                    items.append(InputFile(save_gray16(_as_crop(x, i), Path(tmp) / f"array{i:05d}.png"), "crop",
                                           side))
                else:
                    items.extend(collect_inputs([Path(x)], kind=kind, side=side))
            yield items, Path(tmp)

    def predict(self, inputs: Input | Iterable[Input], *, out: str | Path | None = None, side: str | None = None,
                kind: str | None = None, cam: bool = False, knee_check: bool = True, batch_size: int = 16,
                progress: bool = False) -> pd.DataFrame:
        """Grade every knee of `inputs`: one row per knee, or per file not graded, with the reason in `error`.

        Args:
            inputs: paths (DICOM films, crops, folders, CSV lists), `InputFile`s, or numpy crops (H, W) in [0, 1]
                (float) or 0-255 / 0-65535 (integer), in radiographic orientation.
            out: folder for predictions.csv, crops/ and cam/ (as `kneeoa predict --out`); default: a temporary
                folder, removed afterwards, whose crop and cam paths are then left empty in the table.
            side, kind: for inputs that do not say (as `--side`, `--kind`); numpy crops are of kind crop.
            cam: write Grad-CAM overlays (needs `out`).
            knee_check: refuse images the knee check finds unlike knees (scores are written either way).

        Returns:
            The table of `kneeoa predict`'s predictions.csv (see `kneeoa.deploy.predict`).
        """
        from kneeoa.deploy.predict import predict_files

        with self._files(inputs, side, kind) as (items, tmp):
            target = Path(out) if out is not None else tmp / "out"
            table = predict_files(self._model, items, target, cam=cam, batch_size=batch_size,
                                  knee_check=knee_check, progress=progress)
            arrays = {str(i.path): f"<array {n}>" for n, i in enumerate(items) if Path(i.path).parent == tmp}
            table["file"] = table["file"].replace(arrays)
            if out is None:
                table["crop"], table["cam"] = np.nan, np.nan
        return table

    def explain(self, inputs: Input | Iterable[Input], *, task: str | None = None, side: str | None = None,
                kind: str | None = None) -> list[dict[str, Any]]:
        """Grad-CAM maps of the graded knees of `inputs`, as arrays.

        Returns:
            One dict per graded knee: "file", "side", "task", "class" (the decoded class explained), "crop" (the
            (H, W) float crop graded) and "map" ((H, W) float in [0, 1], resized onto the crop). Kinds of model without
            gradients (embedding + XGBoost) give no maps: an empty list.

        Raises:
            ConfigError: `task` is not one of `tasks`.
        """
        from kneeoa.deploy.predict import explain, grade_films
        from kneeoa.errors import ConfigError
        from kneeoa.explain.cam import resize_map

        tasks = [task] if task else self.tasks
        unknown = [t for t in tasks if t not in self.info["tasks"]]
        if unknown:
            raise ConfigError(f"This grader has no task {unknown[0]!r}; its tasks: {', '.join(self.tasks)}.")
        out: list[dict[str, Any]] = []
        with self._files(inputs, side, kind) as (items, tmp):
            for film in grade_films(self._model, items, tmp / "crops"):
                for knee in film.knees:
                    explain(self._model, knee, tasks)
                    out += [{"file": str(film.source.path), "side": knee.side, "task": t, "class": knee.classes[t],
                             "crop": knee.crop, "map": resize_map(heat, knee.crop.shape)}
                            for t, heat in knee.cams.items()]
        return out


def _as_crop(x: np.ndarray, index: int) -> np.ndarray:
    """A numpy crop as float [0, 1]; integer arrays are read as 8-bit, or 16-bit when any value is over 255."""
    from kneeoa.errors import ConfigError

    arr = np.asarray(x)
    if arr.ndim != 2 or min(arr.shape) == 0:
        raise ConfigError(f"Input array {index} has shape {arr.shape}; a crop is one 2-D grayscale image (H, W).")
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float32) / (65535.0 if arr.max() > 255 else 255.0)
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        raise ConfigError(f"Input array {index} has values outside [0, 1] (or NaN); give float crops in [0, 1] or "
                          "integer images.")
    return arr


def load_model(name_or_path: str | Path | None = None, *, encoder_weights: str | Path | None = None) -> Grader:
    """A grader ready to use: the built-in one (no argument), another built-in by name, or an exported package.

    Args:
        name_or_path: None (the default built-in grader), a built-in's name (`builtin_models()`), or a package
            folder made by `kneeoa export`.
        encoder_weights: embedding arms only: the encoder snapshot folder on this machine.

    Raises:
        ConfigError: no such built-in or package; PackageError: an incomplete package.
    """
    from kneeoa.deploy.builtin import resolve_model
    from kneeoa.deploy.package import load_model as load_package

    model_dir = resolve_model(name_or_path)
    return Grader(load_package(model_dir, encoder_weights=Path(encoder_weights) if encoder_weights else None),
                  model_dir)


def builtin_models() -> list[str]:
    """Names of the built-in graders shipped with this kneeoa; `load_model()` with no name loads
    `kneeoa.deploy.builtin.DEFAULT_MODEL`."""
    from kneeoa.deploy.builtin import builtin_names

    return builtin_names()
