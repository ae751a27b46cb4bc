"""Finding pretrained weights: an explicit local folder, then the local Hugging Face cache, then the hub.

Every model family resolves its weights through `resolve_snapshot`, so the order and the error are stated once. A
"snapshot" is a folder in the hub repository's own layout, exactly what `huggingface-cli download REPO --local-dir
DIR` or `huggingface_hub.snapshot_download` writes: the files sit at the top level under their hub names.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kneeoa.errors import WeightsNotFoundError

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """A resolved weights folder.

    Attributes:
        path: the folder holding the hub files.
        source: "local folder", "HF cache" or "hub" (where it was found).
        revision: the hub commit it came from, or "unknown" for a folder with no download metadata.
    """

    path: Path
    source: str
    revision: str


@dataclass(frozen=True)
class Layout:
    """The files a usable snapshot must hold.

    Attributes:
        required: files that must all be present (names relative to the snapshot folder).
        any_of: groups of alternatives; one file of each group must be present (e.g. .safetensors or .bin weights).
    """

    required: tuple[str, ...] = ()
    any_of: tuple[tuple[str, ...], ...] = ()

    def missing(self, folder: Path) -> list[str]:
        """The required files (or ' or '-joined alternatives) absent from `folder`."""
        out = [f for f in self.required if not (folder / f).is_file()]
        out += [" or ".join(g) for g in self.any_of if not any((folder / f).is_file() for f in g)]
        return out

    def describe(self) -> str:
        return ", ".join([*self.required, *(" or ".join(g) for g in self.any_of)])

    def patterns(self) -> list[str]:
        return [*self.required, *(f for g in self.any_of for f in g)]


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set or the hub cannot be reached: hub lookups would fail (after ~45 s of retries).

    Reachability is probed once per process (a 3 s TCP connect to the hub's host). An unreachable hub sets
    HF_HUB_OFFLINE=1 in this process's environment, so processes it starts (the other ranks of a distributed run)
    inherit the answer instead of waiting again.
    """
    from huggingface_hub import is_offline_mode

    if is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    if not _hub_reachable():
        _log.warning("the Hugging Face hub (%s) is unreachable; working offline (HF_HUB_OFFLINE=1)", _hub_host())
        os.environ["HF_HUB_OFFLINE"] = "1"
        return True
    return False


def _hub_host() -> str:
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


@functools.cache
def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connect to the hub (port 443). Behind a proxy the direct probe says nothing, so it is not made."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        socket.create_connection((_hub_host(), 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def folder_revision(folder: Path) -> str:
    """The hub commit of a snapshot folder: a cache snapshot is named by it; a `--local-dir` download records it in
    `.cache/huggingface/download/*.metadata` (first line). "unknown" when neither applies."""
    folder = Path(folder)
    if folder.parent.name == "snapshots" and len(folder.name) == 40:
        return folder.name
    for meta in sorted((folder / ".cache" / "huggingface" / "download").glob("**/*.metadata")):
        first = meta.read_text(errors="replace").splitlines()[:1]
        if first and len(first[0].strip()) == 40:
            return first[0].strip()
    return "unknown"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks (a 600 MB checkpoint takes a couple of seconds)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch_command(hub_id: str, dest: str = "DIR") -> str:
    return f"huggingface-cli download {hub_id} --local-dir {dest}"


def _from_cache(hub_id: str, layout: Layout) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure here only means "not cached"; the error below lists every place
        return None
    return None if layout.missing(path) else path


def locate_snapshot(hub_id: str, layout: Layout,
                    weights: str | Path | None = None) -> tuple[Snapshot | None, list[str]]:
    """Where the weights would load from now, without downloading: (snapshot or None, what was tried and why not)."""
    tried: list[str] = []
    # 1. An explicit folder wins and is never second-guessed: falling back would silently load other weights.
    if weights is not None:
        folder = Path(weights).expanduser()
        if not folder.is_dir():
            return None, [f"local folder {folder}: does not exist"]
        missing = layout.missing(folder)
        if missing:
            return None, [f"local folder {folder}: missing {', '.join(missing)}"]
        return Snapshot(folder.resolve(), "local folder", folder_revision(folder)), tried
    # 2. The local Hugging Face cache (HF_HOME / HF_HUB_CACHE), as filled by any earlier download on this machine.
    cached = _from_cache(hub_id, layout)
    if cached is not None:
        return Snapshot(cached, "HF cache", folder_revision(cached)), tried
    tried.append(f"HF cache: no complete snapshot of {hub_id}")
    return None, tried


def resolve_snapshot(hub_id: str, layout: Layout, weights: str | Path | None = None, *, what: str,
                     fetch_hint: str) -> Snapshot:
    """The snapshot folder for `hub_id`: explicit folder, else local HF cache, else a hub download.

    Args:
        hub_id: hub repository, e.g. "microsoft/rad-dino".
        layout: the files the folder must hold.
        weights: an explicit snapshot folder; when given, nothing else is tried.
        what: the model's name for messages ("RAD-DINO").
        fetch_hint: the kneeoa command that fetches it on a connected machine.

    Raises:
        WeightsNotFoundError: naming the hub id, every place tried, the expected layout and the fetch commands.
    """
    snap, tried = locate_snapshot(hub_id, layout, weights)
    if snap is not None:
        _log.info("%s weights: %s (%s, revision %s)", what, snap.path, snap.source, snap.revision)
        return snap
    if weights is None:
        # 3. The hub, unless the machine is marked offline.
        if hub_offline():
            tried.append("hub: skipped (HF_HUB_OFFLINE=1)")
        else:
            from huggingface_hub import snapshot_download

            try:
                path = Path(snapshot_download(hub_id, allow_patterns=layout.patterns()))
                if not layout.missing(path):
                    return Snapshot(path, "hub", folder_revision(path))
                tried.append(f"hub: download of {hub_id} lacks {', '.join(layout.missing(path))}")
            except Exception as e:  # noqa: BLE001 - network, auth and missing-repo failures all end in the one error
                tried.append(f"hub: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise WeightsNotFoundError(
        f"{what} weights (hub id {hub_id}) were not found. Tried: {'; '.join(tried)}. "
        f"Expected a folder in the hub's layout holding {layout.describe()}. "
        f"On a connected machine run `{fetch_hint}` (or `{fetch_command(hub_id)}`), copy the snapshot folder here "
        "and pass it with --weights <folder>, the config key foundation.weights, or foundation.weights_root for a "
        "folder of snapshots named by encoder.")


def fetch_snapshot(hub_id: str, dest: Path, layout: Layout) -> Path:
    """Download `hub_id` into `dest` in the hub layout (on a connected machine).

    Raises:
        WeightsNotFoundError: the hub is unreachable or the download lacks required files.
    """
    from huggingface_hub import snapshot_download

    if hub_offline():
        raise WeightsNotFoundError(f"Cannot fetch {hub_id}: HF_HUB_OFFLINE=1 is set. Unset it on a machine with "
                                   f"internet access, or run `{fetch_command(hub_id, str(dest))}` there.")
    try:
        path = Path(snapshot_download(hub_id, local_dir=dest))
    except Exception as e:  # noqa: BLE001
        raise WeightsNotFoundError(f"Cannot fetch {hub_id} into {dest}: {type(e).__name__}: {e}. This needs access "
                                   "to huggingface.co; run the same command on a connected machine and copy the "
                                   "folder here.") from e
    missing = layout.missing(path)
    if missing:
        raise WeightsNotFoundError(f"Fetched {hub_id} into {path} but it lacks {', '.join(missing)}.")
    return path


def fetch_file(hub_id: str, filename: str, dest: Path) -> Path:
    """Download one file of `hub_id` into `dest` (used for companion files such as a text tower's config.json)."""
    from huggingface_hub import hf_hub_download

    if hub_offline():
        raise WeightsNotFoundError(f"Cannot fetch {hub_id}/{filename}: HF_HUB_OFFLINE=1 is set.")
    try:
        return Path(hf_hub_download(hub_id, filename, local_dir=dest))
    except Exception as e:  # noqa: BLE001
        raise WeightsNotFoundError(f"Cannot fetch {hub_id}/{filename} into {dest}: {type(e).__name__}: {e}.") from e


def cached_file(hub_id: str, filename: str) -> Path | None:
    """`filename` of `hub_id` from the local HF cache, or None (never touches the network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_id, filename)
    return Path(found) if isinstance(found, str) else None


def first_existing(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)
