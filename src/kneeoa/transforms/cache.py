"""Decoded-image cache: every manifest image at one training resolution, as uint8, in one memory-mapped file.

Training reads the same crops every epoch; decoding PNGs and resizing them each time made the CPU loop data-bound.
The cache is built once per run and size (`RUN_DIR/cache/images_<S>.u8`, rows in manifest order, mirrored rows
already flipped) with a JSON record of what it holds; a manifest that changed (other images, other order, other
mirroring) rebuilds it. It is written under a temporary name and renamed when complete, so a killed build never
leaves a half-filled cache that looks finished.

Its pixels are the quantisation step of a CNN's `kneeoa.transforms.preprocess.Preprocess` (`to_uint8`), which
depends on the size alone: one cache serves every backbone trained at that size, whatever its normalisation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from kneeoa.io import atomic_path
from kneeoa.sources.manifest import load_knee
from kneeoa.transforms.preprocess import to_uint8

CACHE_DIR = "cache"


def _fingerprint(rows: pd.DataFrame, size: int) -> str:
    mirrored = rows["mirrored"] if "mirrored" in rows else pd.Series(False, index=rows.index)
    text = "\n".join(f"{i}\t{p}\t{bool(m)}" for i, p, m in zip(rows["image_id"], rows["image_path"], mirrored,
                                                               strict=True))
    return hashlib.sha256(f"{size}\n{text}".encode()).hexdigest()


def image_cache(run_dir: Path, rows: pd.DataFrame, size: int, *, progress: bool = True) -> np.ndarray:
    """(n, size, size) uint8 array of `rows`' images, memory-mapped read-only; built on first use.

    Args:
        run_dir: the run folder (cache goes to RUN_DIR/cache/).
        rows: manifest rows (image_id, image_path, optional mirrored), in the order wanted.
        size: square side in pixels.
    """
    folder = Path(run_dir) / CACHE_DIR
    fp = _fingerprint(rows, size)
    data, meta = folder / f"images_{size}_{fp[:12]}.u8", folder / f"images_{size}_{fp[:12]}.json"
    if meta.exists() and data.exists():
        info = json.loads(meta.read_text())
        if info.get("fingerprint") == fp and data.stat().st_size == len(rows) * size * size:
            return np.memmap(data, dtype=np.uint8, mode="r", shape=(len(rows), size, size))
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(data) as tmp:
        out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(len(rows), size, size))
        for i, (_, row) in enumerate(tqdm(rows.iterrows(), total=len(rows), desc=f"caching images at {size} px",
                                          disable=not progress, leave=False)):
            out[i] = to_uint8(load_knee(run_dir, row), size)
        out.flush()
        del out
    with atomic_path(meta) as tmp:
        Path(tmp).write_text(json.dumps({"fingerprint": fp, "size": size, "n": len(rows)}))
    return np.memmap(data, dtype=np.uint8, mode="r", shape=(len(rows), size, size))
