"""File-level work across processes for the importers, and the cheap check that an image file opens.

`process_map(fn, items, workers=...)` maps a picklable function over items on worker processes (one math-library
thread each) with a progress bar, results in item order. Workers are spawned rather than forked once this process
has loaded torch (a fork of a live OpenMP pool can hang), so a script calling it needs a `__main__` guard.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from PIL import Image

T = TypeVar("T")
R = TypeVar("R")


def _one_thread_per_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"


def process_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int, desc: str, unit: str = "file",
                min_per_worker: int = 64) -> list[R]:
    """`[fn(x) for x in items]` on up to `workers` processes, with a progress bar.

    Each worker gets at least `min_per_worker` items (starting a process costs more than checking a few small
    files), so short lists run in this process.
    """
    from tqdm.auto import tqdm

    items = list(items)
    workers = max(1, min(int(workers), os.cpu_count() or 1, -(-len(items) // min_per_worker)))
    with tqdm(total=len(items), desc=desc, unit=unit, disable=None) as bar:
        if workers == 1:
            out = []
            for item in items:
                out.append(fn(item))
                bar.update()
            return out
        context = multiprocessing.get_context("spawn" if "torch" in sys.modules else None)
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_one_thread_per_worker) as pool:
            out = []
            for result in pool.map(fn, items, chunksize=max(1, len(items) // (workers * 8))):
                out.append(result)
                bar.update()
            return out


def check_image(path: str) -> str | None:
    """None when `path` decodes as a non-empty 2-D image; else why not (empty, truncated, not an image)."""
    try:
        if os.path.getsize(path) == 0:
            return "the file is empty (0 bytes)"
        with Image.open(path) as im:
            im.load()  # a full decode: knee crops are small, and truncation shows only here
            if im.width < 1 or im.height < 1:
                return f"the image has no pixels ({im.width}x{im.height})"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"cannot be read as an image ({type(e).__name__}: {e})"
    return None
