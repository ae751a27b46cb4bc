"""A torch Dataset over manifest rows: grayscale crops at model size with their multi-task labels.

Images are decoded and resized once and kept in memory as float16 when they fit (`cache_limit_gb`), so epochs cost
only the model; otherwise they are read from disk on every access.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from kneeoa.data.images import load_gray, resize
from kneeoa.data.manifest import resolve_image_path

MISSING_LABEL = -1  # ignore_index of the losses: a task without a label for this image


class KneeDataset(Dataset):
    """Crops of `rows` as normalised (1, S, S) tensors and a {task: int} label dict (-1 = missing).

    Args:
        rows: manifest rows (image_id, image_path and the task columns).
        run_dir: the run folder image paths are relative to.
        tasks: task names to return labels for.
        image_size: model input size S.
        mean, std: single-channel normalisation of the backbone.
        augment: random affine, flip and contrast jitter (training only).
    """

    def __init__(self, rows: pd.DataFrame, run_dir: Path, tasks: list[str], *, image_size: int, mean: float,
                 std: float, augment: bool = False, cache_limit_gb: float = 4.0, progress: bool = False) -> None:
        self.rows = rows.reset_index(drop=True)
        self.run_dir, self.tasks, self.size = Path(run_dir), tasks, image_size
        self.mean, self.std, self.augment = mean, std, augment
        self.labels = {t: self.rows[t].fillna(MISSING_LABEL).to_numpy(dtype="int64") if t in self.rows
                       else np.full(len(self.rows), MISSING_LABEL, dtype="int64") for t in tasks}
        self._cache: torch.Tensor | None = None
        if len(self.rows) * image_size**2 * 2 / 1e9 <= cache_limit_gb:
            from tqdm.auto import tqdm

            paths = self.rows["image_path"]
            self._cache = torch.stack([self._read(p) for p in tqdm(paths, desc="loading crops", disable=not progress,
                                                                   leave=False)]).to(torch.float16)
        if augment:
            from torchvision.transforms import v2

            self._aug = v2.Compose([v2.RandomHorizontalFlip(),
                                    v2.RandomAffine(degrees=7, translate=(0.04, 0.04), scale=(0.92, 1.08))])

    def _read(self, image_path: str) -> torch.Tensor:
        img = resize(load_gray(resolve_image_path(self.run_dir, image_path)), self.size)
        return torch.from_numpy(img).unsqueeze(0)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, int]]:
        x = self._cache[i].float() if self._cache is not None else self._read(self.rows.at[i, "image_path"])
        if self.augment:
            x = self._aug(x)
            gain, bias = np.random.uniform(0.85, 1.15), np.random.uniform(-0.06, 0.06)
            x = (x - 0.5) * gain + 0.5 + bias
        x = (x - self.mean) / self.std
        return x, {t: int(self.labels[t][i]) for t in self.tasks}
