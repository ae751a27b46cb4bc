"""Old import paths of modules that moved when the tree was arranged by concern, kept working for one release.

Marked for removal in the next release: `import kneeoa.data.dicom` (and every other path in `MOVED`) still imports
the module at its new place, `kneeoa.formats.dicom`, and warns once with a `DeprecationWarning` naming the new path.
The finder is installed first on `sys.meta_path` by `import kneeoa` (so an old path's submodules are never loaded a
second time under the old name); it only answers for the old names below, so it never shadows a real module. Three
old modules became packages of the same name and are not aliased: `kneeoa.cli` (its `app` is still
`kneeoa.cli:app`), `kneeoa.models.cnn` (now `kneeoa.models.cnn.backbones`) and `kneeoa.models.encoders` (now
`kneeoa.models.encoders.base`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old module path -> new module path (packages map their submodules too: kneeoa.data.phantom.films -> ...)
MOVED: dict[str, str] = {
    "kneeoa.commands_common": "kneeoa.cli.common",
    "kneeoa.commands_deploy": "kneeoa.cli.deploy",
    "kneeoa.commands_localize": "kneeoa.cli.localize",
    "kneeoa.commands_models": "kneeoa.cli.models",
    "kneeoa.commands_prepare": "kneeoa.cli.prepare",
    "kneeoa.commands_pretrain": "kneeoa.cli.pretrain",
    "kneeoa.bootstrap": "kneeoa.stats.bootstrap",
    "kneeoa.calibration": "kneeoa.stats.calibration",
    "kneeoa.comparisons": "kneeoa.stats.comparisons",
    "kneeoa.metrics": "kneeoa.stats.metrics",
    "kneeoa.weighted": "kneeoa.stats.weighted",
    "kneeoa.estimators": "kneeoa.models.estimators",
    "kneeoa.cam": "kneeoa.explain.cam",
    "kneeoa.occlusion": "kneeoa.explain.occlusion",
    "kneeoa.mask_scores": "kneeoa.explain.mask_scores",
    "kneeoa.data.dicom": "kneeoa.formats.dicom",
    "kneeoa.data.images": "kneeoa.formats.images",
    "kneeoa.data.pool": "kneeoa.formats.pool",
    "kneeoa.data.phantom": "kneeoa.synthetic.phantom",
    "kneeoa.data.crop_films": "kneeoa.synthetic.crop_films",
    "kneeoa.data.localize": "kneeoa.localize.core",
    "kneeoa.data.localize_heatmap": "kneeoa.localize.heatmap",
    "kneeoa.data.localize_train": "kneeoa.localize.train",
    "kneeoa.data.localize_check": "kneeoa.localize.check",
    "kneeoa.data.films": "kneeoa.localize.films",
    "kneeoa.data.overview": "kneeoa.localize.overview",
    "kneeoa.data.knee_gate": "kneeoa.localize.knee_gate",
    "kneeoa.data.importers": "kneeoa.sources.importers",
    "kneeoa.data.oai": "kneeoa.sources.oai",
    "kneeoa.data.csv_table": "kneeoa.sources.csv_table",
    "kneeoa.data.folders": "kneeoa.sources.folders",
    "kneeoa.data.manifest": "kneeoa.sources.manifest",
    "kneeoa.data.splits": "kneeoa.sources.splits",
    "kneeoa.data.augment": "kneeoa.transforms.augment",
    "kneeoa.data.cache": "kneeoa.transforms.cache",
    "kneeoa.data.dataset": "kneeoa.transforms.dataset",
    "kneeoa.models.preprocess": "kneeoa.transforms.preprocess",
    "kneeoa.models.twobranch": "kneeoa.models.cnn.twobranch",
    "kneeoa.models.heads": "kneeoa.models.cnn.heads",
    "kneeoa.models.infer": "kneeoa.models.cnn.infer",
    "kneeoa.models.resume": "kneeoa.models.cnn.resume",
    "kneeoa.models.ssl": "kneeoa.models.cnn.ssl",
    "kneeoa.models.foundation": "kneeoa.models.encoders.foundation",
    "kneeoa.models.encoder_loaders": "kneeoa.models.encoders.loaders",
    "kneeoa.models.ssl_encoders": "kneeoa.models.encoders.ssl",
    "kneeoa.models.device": "kneeoa.models.encoders.device",
    "kneeoa.models.zero_shot": "kneeoa.models.encoders.zero_shot",
    "kneeoa.models.encoder_cam": "kneeoa.arms.encoder_cam",
    "kneeoa.models.arm_predictors": "kneeoa.arms.predictors",
}
#: Old packages that no longer exist as folders: importing them gives an empty namespace that the old paths hang off.
OLD_PACKAGES = ("kneeoa.data",)


def new_name(old: str) -> str | None:
    """The module's current path, or None when `old` is not an old path."""
    for prefix in sorted(MOVED, key=len, reverse=True):
        if old == prefix or old.startswith(prefix + "."):
            return MOVED[prefix] + old[len(prefix):]
    return None


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec):
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:
        """The module is the new one, already executed."""


class _OldPackage(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        module.__path__ = []


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves the old paths in `MOVED` to the modules at their new places, with a DeprecationWarning."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in OLD_PACKAGES:
            return importlib.util.spec_from_loader(fullname, _OldPackage(), is_package=True)
        new = new_name(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; the old path goes away in the next release.", DeprecationWarning,
                      stacklevel=2)
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Put the finder first on `sys.meta_path`, once."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
