"""A torch Dataset over the decoded-image cache: uint8 crops at model size with their multi-task labels.

Images come from `kneeoa.transforms.cache.image_cache` (decoded, mirrored where the manifest says so, resized, uint8),
so a batch is one fancy-indexing read of a memory-mapped array (`__getitems__`, which the DataLoader calls with the
batch's indices). Conversion to float, augmentation and normalisation happen on the whole batch in the loader's
collate_fn (`kneeoa.transforms.augment.BatchTransform`), not per image.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

MISSING_LABEL = -1  # ignore index of the losses: a task without a label for this image


def task_labels(rows: pd.DataFrame, tasks: list[str]) -> dict[str, np.ndarray]:
    """{task: (n,) int64 labels} with MISSING_LABEL where the manifest has none (or lacks the task column)."""
    return {t: rows[t].fillna(MISSING_LABEL).to_numpy(dtype="int64") if t in rows
            else np.full(len(rows), MISSING_LABEL, dtype="int64") for t in tasks}


class KneeDataset(Dataset):
    """Cached crops of some manifest rows as (1, S, S) uint8 tensors and {task: label} (-1 = missing).

    Args:
        images: (N, S, S) uint8 array of the whole manifest (the cache).
        index: positions in `images` of this dataset's rows, in order.
        labels: {task: (len(index),) int64} labels of those rows.
    """

    def __init__(self, images: np.ndarray, index: np.ndarray, labels: dict[str, np.ndarray]) -> None:
        self.images, self.index, self.labels = images, np.asarray(index, dtype="int64"), labels

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(self, items: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        items = np.asarray(items, dtype="int64")
        x = torch.from_numpy(np.ascontiguousarray(self.images[self.index[items]])).unsqueeze(1)
        return x, {t: torch.from_numpy(v[items]) for t, v in self.labels.items()}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = self.__getitems__([i])
        return x[0], {t: v[0] for t, v in y.items()}

