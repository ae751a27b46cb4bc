"""Session fixtures for the export / predict / serve tests (a pytest plugin: `pytest_plugins = ["deploy_fixtures"]`).

One tiny trained run (ResNet18 at 32 px, one epoch, random init) made by the real train, evaluate and stats stages,
its exported package, two phantom bilateral DICOM films, and the real server on a loopback port. Built once per
session, so every deploy test file shares them.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARM = "resnet18"


@pytest.fixture(scope="session")
def deploy_run(tmp_path_factory) -> Path:
    from conftest import make_tiny_run
    from kneeoa.config import Config, dump_config
    from kneeoa.stages import get_stage

    run = tmp_path_factory.mktemp("deploy") / "run"
    make_tiny_run(run, patients=12, size=64)
    cfg = Config(name="deploy-test")
    cfg.data.image_size = 64
    cfg.cnn.backbones, cfg.cnn.epochs, cfg.cnn.image_size = [ARM], 1, 32
    cfg.cnn.pretrained, cfg.cnn.batch_size = "none", 8
    cfg.stats.n_boot = 50
    (run / "config.yaml").write_text(dump_config(cfg))
    for stage in ("train", "evaluate", "stats"):
        get_stage(stage)(run, cfg)
    return run


@pytest.fixture(scope="session")
def cnn_package(deploy_run, tmp_path_factory) -> Path:
    from kneeoa.deploy.package import export_arm

    return export_arm(deploy_run, ARM, tmp_path_factory.mktemp("pkg") / "model")


@pytest.fixture(scope="session")
def phantom_films(tmp_path_factory) -> list[Path]:
    """Two phantom bilateral PA films (DICOM, 0.5 mm pixels)."""
    from kneeoa.synthetic.phantom.films import write_phantom_release

    root = tmp_path_factory.mktemp("films")
    truth = write_phantom_release(root, patients=2, visits=1, seed=0, spacings_mm=(0.5,), workers=1)
    return [root / p for p in sorted(set(truth.loc[truth["has_film"], "film_path"]))]


def crop_list(run: Path, out: Path, split: str = "test") -> Path:
    """A CSV list (file, side) of a run's crops of one split, for `kneeoa predict`."""
    m = pd.read_parquet(run / "manifest.parquet")
    m = m[m["split"] == split]
    pd.DataFrame({"file": [str(run / p) for p in m["image_path"]], "side": m["side"],
                  "image_id": m["image_id"]}).to_csv(out, index=False)
    return out


class LiveServer:
    """The real app under uvicorn on 127.0.0.1 (an ephemeral port), in a thread; stops on `stop()`."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", limit_concurrency=64))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 30.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="session")
def live_server(cnn_package):
    from kneeoa.deploy.serve import create_app

    server = LiveServer(create_app(cnn_package, max_upload_mb=2.0)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def builtin_server():
    """The real app on the built-in grader (what `kneeoa serve` with no --model serves)."""
    from kneeoa.deploy.builtin import resolve_model
    from kneeoa.deploy.serve import create_app

    server = LiveServer(create_app(resolve_model(), max_upload_mb=8.0)).start()
    yield server
    server.stop()
