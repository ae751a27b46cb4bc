"""Stage `embed`: one frozen-encoder vector per manifest image, in RUN_DIR/embeddings/<encoder>.parquet.

The table holds `image_id` and `emb_0 .. emb_{D-1}` (float32), in manifest order; RUN_DIR/embeddings/<encoder>.json
records the model id, revision, weights checksum, features, size, precision and preprocessing that made it.

Embedding RAD-DINO on two CPU cores takes hours, so the work is resumable: each batch is written atomically as a
shard under RUN_DIR/embeddings/<encoder>.parts/, beside a meta.json of the model that made them. A rerun skips the
images already in shards. When the model differs (another revision, checksum, feature choice, precision or
preprocessing) the old shards are discarded with a warning, so one table never mixes model versions.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from kneeoa.config import Config
from kneeoa.errors import WeightsNotFoundError
from kneeoa.io import write_json, write_parquet
from kneeoa.models.encoders.foundation import create_encoder, encoder_arms, features_for, get_encoder_spec, weights_for
from kneeoa.runfolder.arms import record_arm
from kneeoa.runfolder.embeddings import (
    embeddings_path,
    read_embedding_info,
    shards_dir,
    vector_columns,
    write_embeddings,
)
from kneeoa.runfolder.manifest import load_knee, read_manifest

_log = logging.getLogger(__name__)

#: Provenance keys that define "the same model": a moved folder keeps its shards, a new checkpoint does not.
MODEL_KEYS = ("model_id", "revision", "checksum", "features", "dim", "precision", "preprocess")


def _model_meta(describe: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({k: describe[k] for k in MODEL_KEYS}))  # tuples -> lists, as read back from JSON


def _open_parts(parts: Path, meta: dict[str, Any]) -> pd.DataFrame:
    """The finished shards of a previous run by the same model; other shards are removed with a warning."""
    meta_file = parts / "meta.json"
    if meta_file.exists():
        old = json.loads(meta_file.read_text())
        if old == meta:
            shards = sorted(parts.glob("part-*.parquet"))
            return pd.concat([pd.read_parquet(s) for s in shards], ignore_index=True) if shards else pd.DataFrame()
        changed = [k for k in MODEL_KEYS if old.get(k) != meta.get(k)]
        warnings.warn(f"{parts} was made by another model ({', '.join(changed)} changed: "
                      f"{ {k: old.get(k) for k in changed if k != 'preprocess'} } -> "
                      f"{ {k: meta.get(k) for k in changed if k != 'preprocess'} }); discarding its shards and "
                      "starting again.", UserWarning, stacklevel=3)
    if parts.exists():
        shutil.rmtree(parts)
    parts.mkdir(parents=True)
    write_json(meta, meta_file)
    return pd.DataFrame()


def _is_current(run_dir: Path, encoder: str, meta: dict[str, Any], ids: pd.Series) -> bool:
    path, info = embeddings_path(run_dir, encoder), read_embedding_info(run_dir, encoder)
    if not path.exists() or info is None or _model_meta(info) != meta:
        return False
    return set(ids) <= set(pd.read_parquet(path, columns=["image_id"])["image_id"])


def embed_one(run_dir: Path, encoder: str, weights: str | Path | None, cfg: Config, *,
              progress: bool = True) -> Path:
    """Embed every manifest image with one encoder, resuming from finished shards.

    Args:
        run_dir: the run folder (its manifest.parquet lists the crops).
        encoder: registry name, `biomedclip` or `rad-dino`.
        weights: a snapshot folder; None uses the config (`foundation.weights`, `weights_root`), the HF cache, the hub.
        cfg: the study config (batch size, features, precision, device from `cfg.foundation`).

    Returns:
        RUN_DIR/embeddings/<encoder>.parquet.

    Raises:
        WeightsNotFoundError: no usable weights (the message says where to get them).
    """
    run_dir, fc = Path(run_dir), cfg.foundation
    spec = get_encoder_spec(encoder)
    manifest = read_manifest(run_dir)
    enc = create_encoder(spec.name, weights if weights is not None else weights_for(fc, spec.name, run_dir),
                         features=features_for(fc, spec.name), precision=fc.precision, device=fc.device)
    meta = _model_meta(enc.describe())
    out = embeddings_path(run_dir, spec.name)
    if _is_current(run_dir, spec.name, meta, manifest["image_id"]):
        _log.info("%s is up to date; nothing to embed.", out)
        return out
    parts = shards_dir(run_dir, spec.name)
    done = _open_parts(parts, meta)
    done_ids = set(done["image_id"]) if len(done) else set()
    todo = manifest.index[~manifest["image_id"].isin(done_ids)].to_numpy()
    seq = len(list(parts.glob("part-*.parquet")))
    cols = vector_columns(enc.dim)
    start = time.perf_counter()
    with tqdm(total=len(manifest), initial=len(manifest) - len(todo), desc=f"embed {spec.name}", unit="img",
              disable=not progress) as bar:
        for lo in range(0, len(todo), fc.batch_size):
            rows = manifest.loc[todo[lo:lo + fc.batch_size]]
            images = [load_knee(run_dir, r) for r in rows.to_dict("records")]
            vectors = enc.encode(images)
            shard = pd.DataFrame(vectors, columns=cols).astype("float32")
            shard.insert(0, "image_id", rows["image_id"].to_numpy())
            write_parquet(shard, parts / f"part-{seq:06d}.parquet")
            seq += 1
            bar.update(len(rows))
    seconds = time.perf_counter() - start
    table = pd.concat([pd.read_parquet(s) for s in sorted(parts.glob("part-*.parquet"))], ignore_index=True)
    table = table.drop_duplicates("image_id").set_index("image_id").loc[manifest["image_id"]].reset_index()
    write_embeddings(table, {**enc.describe(), "n_images": len(table), "n_embedded_this_run": len(todo),
                             "seconds_this_run": round(seconds, 2),
                             "images_per_s": round(len(todo) / seconds, 3) if len(todo) and seconds > 0 else None},
                     run_dir, spec.name)
    shutil.rmtree(parts)
    return out


def run(run_dir: Path, cfg: Config) -> None:
    """Embed with every encoder in `cfg.foundation.encoders`; one without weights is recorded as not run and skipped.

    The arms built on a skipped encoder (`<prefix>_xgb`, `<prefix>_linear`) get an arm record whose reason is the
    weights error, so the report shows why they have no numbers.
    """
    for name in cfg.foundation.encoders:
        spec = get_encoder_spec(name)
        try:
            embed_one(run_dir, spec.name, None, cfg)
        except WeightsNotFoundError as e:
            _log.warning("Skipping %s: %s", spec.title, e)
            for arm in encoder_arms(cfg.foundation, spec.name):
                record_arm(run_dir, arm, status="not_run", reason=str(e))
