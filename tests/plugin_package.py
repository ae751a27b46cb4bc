"""A small outside package with one toy entry per kneeoa entry-point group, installed into a tmp folder for a test.

`write_distribution` writes a module and its `<name>-0.1.dist-info/` folder (METADATA and entry_points.txt, in the
format pip writes) into a folder; `installed(folder)` puts that folder on sys.path (and PYTHONPATH, for
subprocesses) so `importlib.metadata` finds the distribution, and makes kneeoa's registries read their entry points
again; on leaving, everything is taken back (the toy entries are gone, the registries read their groups afresh).

The fixture `outside_plugins` installs the toy package `kneeoa_toy_plugin`: the entries `toy` of the groups
kneeoa.backbones, kneeoa.encoders, kneeoa.tasks, kneeoa.importers and kneeoa.localizers. It yields a dict: the
package's folder (`root`), its module (`module`) and an encoder folder the toy encoder embeds with
(`encoder_weights`). Test modules use it through tests/conftest.py (`pytest_plugins`).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

TOY = "toy"
TOY_DIST = "kneeoa_toy_plugin"
#: entry-point group -> the toy module's attribute that is its entry.
TOY_ENTRIES = {"kneeoa.backbones": "BACKBONE", "kneeoa.encoders": "ENCODER", "kneeoa.tasks": "TASK",
               "kneeoa.importers": "IMPORTER", "kneeoa.localizers": "localize_toy"}

TOY_MODULE = '''"""An outside package's kneeoa entries, all named `toy`: a backbone, an encoder, a task, an importer
and a localiser."""

import pandas as pd
import torch
from torch import nn

from kneeoa.formats.images import resize, save_gray16
from kneeoa.localize.core import localize_profile
from kneeoa.models.cnn.backbones import Backbone
from kneeoa.models.encoders.spec import EncoderSpec
from kneeoa.models.hub import Layout
from kneeoa.sources.importers import ImporterOption, ImporterSpec, ImportResult
from kneeoa.synthetic.phantom import render_spec, simulate_cohort
from kneeoa.synthetic.phantom.render import MIN_OUT_PX
from kneeoa.tasks import JSN_SITES, Task


class ToyNet(nn.Module):
    """Two convolutions and global pooling: a backbone that trains in a second."""

    def __init__(self, in_chans: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.num_features = 16
        self.pretrained_cfg = {"mean": (0.5,), "std": (0.25,)}

    def forward(self, x):
        return torch.relu(self.block(torch.relu(self.stem(x)))).mean(dim=(2, 3))


def build_toy(name, source, tag, in_chans):
    net = ToyNet(in_chans)
    if source is not None:
        from safetensors.torch import load_file

        net.load_state_dict(load_file(source))
    return net


BACKBONE = Backbone("toy", None, False, {"last": lambda m: m.block, "penultimate": lambda m: m.stem}, build=build_toy)

# Built by kneeoa's own `random` library: the backbone an encoder folder's config.json names, seed-0 weights.
ENCODER = EncoderSpec(name="toy", title="Toy plugin encoder", hub_id="example/toy", library="random",
                      arm_prefix="toy", features={"pooled": 16}, layout=Layout(("config.json",)), weight_files=(),
                      preprocess_file="config.json", licence="none", paper="an outside package's test encoder",
                      family="toy plugin family")

# Joint-space narrowing of the medial compartment alone, a grade the phantom reads for every knee.
TASK = Task("toy", "binary", ("absent", "present"), JSN_SITES[:1], "any", masks=("jsn",))


def import_toy(source, target, cfg):
    """Phantom knees at any crop size, crops only: an importer that reads no source."""
    rows, size = [], cfg.data.image_size
    for spec in simulate_cohort(patients=cfg.data.patients, visits=1, seed=cfg.seed, low_quality_share=0.0):
        crop = target.crop_file(spec.image_id)
        save_gray16(resize(render_spec(spec, out_px=max(size, MIN_OUT_PX)).image, size), crop)
        rows.append({"image_id": spec.image_id, "patient_id": spec.patient_id, "visit": spec.visit,
                     "side": spec.side, "image_path": target.manifest_path(crop), "low_quality": False,
                     "source": "toy", **spec.grades.as_dict()})
    return ImportResult(manifest=pd.DataFrame(rows), notes=["toy: phantom knees, crops only"])


IMPORTER = ImporterSpec(import_toy, "Import toy phantom knees (an outside package's importer).", path_help=None,
                        options=(ImporterOption("patients", int, "number of patients"),))

#: The knee counts the toy localiser was called for, so a test sees which localiser ran.
CALLS = []


def localize_toy(image, spacing_mm, *, knees):
    """The profile localiser, counting its calls."""
    CALLS.append(knees)
    return localize_profile(image, spacing_mm, knees=knees)
'''


def write_distribution(root: Path, dist: str, entry_points: dict[str, dict[str, str]],
                       modules: dict[str, str] | None = None) -> Path:
    """Write `modules` (module name -> source) and the dist-info folder declaring `entry_points` (group -> name ->
    "module:attribute") into `root`; returns `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, source in (modules or {}).items():
        (root / f"{name}.py").write_text(source)
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in entries.items()) + "\n"
        for group, entries in entry_points.items()))
    return root


def write_toy_package(root: Path) -> Path:
    """The toy package `kneeoa_toy_plugin`: one `toy` entry per group (`TOY_ENTRIES`)."""
    return write_distribution(root, TOY_DIST, {g: {TOY: f"{TOY_DIST}:{attr}"} for g, attr in TOY_ENTRIES.items()},
                              {TOY_DIST: TOY_MODULE})


@contextmanager
def installed(root: Path) -> Iterator[Path]:
    """`root` importable (sys.path, PYTHONPATH) and its distributions' entry points read by every registry; undone
    on leaving, modules imported from `root` included."""
    from kneeoa.registry import reload_plugins

    root = str(root)
    before = set(sys.modules)
    old_pythonpath = os.environ.get("PYTHONPATH")
    sys.path.insert(0, root)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, old_pythonpath) if p)
    importlib.invalidate_caches()
    reload_plugins()
    try:
        yield Path(root)
    finally:
        sys.path.remove(root)
        if old_pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_pythonpath
        for name in set(sys.modules) - before:
            if Path(getattr(sys.modules[name], "__file__", None) or "/").is_relative_to(root):
                del sys.modules[name]
        importlib.invalidate_caches()
        reload_plugins()


def write_toy_encoder(folder: Path) -> Path:
    """An encoder folder naming the toy backbone (32 px, one channel): what the toy encoder embeds with."""
    from kneeoa.models.cnn.backbones import create_backbone
    from kneeoa.models.cnn.encoder_folder import write_encoder

    net, _ = create_backbone(TOY, source=None, in_chans=1)
    config = {"backbone": TOY, "image_size": 32, "mean": 0.5, "std": 0.25, "feature_dim": int(net.num_features),
              "in_chans": 1, "method": "none"}
    return write_encoder(folder, net, config)


@pytest.fixture
def outside_plugins(tmp_path_factory) -> Iterator[dict]:
    """The toy package installed for one test: {"root", "module", "encoder_weights"} (see the module docstring)."""
    root = write_toy_package(tmp_path_factory.mktemp("outside"))
    with installed(root):
        module = importlib.import_module(TOY_DIST)
        yield {"root": root, "module": module, "encoder_weights": write_toy_encoder(root / "toy-encoder")}
