"""Atomic file writes and small run-folder helpers shared by every stage."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from kneeoa.errors import ConfigError, ManifestError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give results the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_parquet(df: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def write_text(text: str, path: Path) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def output_dir(path: Path) -> Path:
    """`path` created as a folder to write into; a ConfigError when it names an existing file (or lies under one)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{path} cannot be an output folder: {p} is a file. Choose another --out.")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(obj: Any, path: Path) -> Path:
    return write_text(json.dumps(obj, indent=2, default=str, allow_nan=True) + "\n", path)


def read_table(path: Path, remake: str) -> pd.DataFrame:
    """A parquet table of the run folder, or a ManifestError naming the file and the command that writes it again
    when the file is empty, truncated or not parquet."""
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError and others on a damaged file
        raise ManifestError(f"{path} cannot be read as a parquet table ({type(e).__name__}: {str(e)[:120]}). It is "
                            f"damaged or truncated: write it again with `{remake}`.") from e
