"""RUN_DIR/embeddings/<encoder>.parquet (owner: `embed`): `image_id` + `emb_0 .. emb_{D-1}` (float32), in manifest
order, with RUN_DIR/embeddings/<encoder>.json beside it: the model id, revision, weights checksum, features, size,
precision and preprocessing that made the vectors (`Encoder.describe()` plus counts and timing).

While `embed` works, finished batches wait as shards in RUN_DIR/embeddings/<encoder>.parts/ (`shards_dir`); they
are the stage's private resume state, never read by another stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kneeoa.errors import ManifestError
from kneeoa.io import write_json, write_parquet

EMBED_DIR = "embeddings"


def embeddings_path(run_dir: Path, encoder: str) -> Path:
    return Path(run_dir) / EMBED_DIR / f"{encoder.lower()}.parquet"


def info_path(run_dir: Path, encoder: str) -> Path:
    return embeddings_path(run_dir, encoder).with_suffix(".json")


def shards_dir(run_dir: Path, encoder: str) -> Path:
    return embeddings_path(run_dir, encoder).with_suffix(".parts")


def vector_columns(dim: int) -> list[str]:
    return [f"emb_{i}" for i in range(dim)]


def embedding_matrix(table: pd.DataFrame) -> np.ndarray:
    """(n_images, D) float32 from an embedding table's emb_* columns, in dimension order."""
    cols = sorted((c for c in table.columns if c.startswith("emb_")), key=lambda c: int(c[4:]))
    return table[cols].to_numpy(dtype=np.float32)


def write_embeddings(table: pd.DataFrame, info: dict[str, Any], run_dir: Path, encoder: str) -> Path:
    """Write the table, then its provenance (a reader that finds the .json finds the table it describes)."""
    path = embeddings_path(run_dir, encoder)
    if "image_id" not in table or not any(c.startswith("emb_") for c in table):
        raise ManifestError(f"{path}: an embedding table needs image_id and emb_* columns; got {list(table)[:5]}.")
    write_parquet(table, path)
    write_json(info, info_path(run_dir, encoder))
    return path


def read_embedding_info(run_dir: Path, encoder: str) -> dict[str, Any] | None:
    """The provenance record of an encoder's table, or None when it has not been made."""
    path = info_path(run_dir, encoder)
    return json.loads(path.read_text()) if path.exists() else None


def read_embeddings(run_dir: Path, encoder: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The embedding table (image_id + emb_*) of an encoder and its provenance record.

    Raises:
        ManifestError: the table is missing (names the command that makes it).
    """
    path = embeddings_path(run_dir, encoder)
    info = read_embedding_info(run_dir, encoder)
    if not path.exists() or info is None:
        raise ManifestError(f"{path} does not exist. Make it with `kneeoa embed {run_dir} --encoder {encoder}`.")
    return pd.read_parquet(path), info


def manifest_matrix(table: pd.DataFrame, manifest: pd.DataFrame, encoder: str, run_dir: Path) -> np.ndarray:
    """(n_manifest_rows, D) float32: an encoder's vectors in manifest order.

    Raises:
        ManifestError: the table lacks a manifest image (names how many, one of them and the command that remakes it).
    """
    missing = ~manifest["image_id"].isin(table["image_id"])
    if missing.any():
        raise ManifestError(f"{embeddings_path(run_dir, encoder)} lacks {int(missing.sum())} manifest image(s), "
                            f"e.g. {manifest['image_id'][missing].iloc[0]!r}. Re-run `kneeoa embed {run_dir} "
                            f"--encoder {encoder}`.")
    return embedding_matrix(table.set_index("image_id").loc[manifest["image_id"]].reset_index())
