"""kneeoa: reproduce and audit the knee-radiograph OA feature study, end to end, and grade knees with its models.

The public Python surface is `__all__`: `load_model` returns a `Grader` (the built-in one by default) whose
`predict` gives the `kneeoa predict` table and `explain` the Grad-CAM maps; `builtin_models` lists the built-ins.
They are imported on first use, so `import kneeoa` stays light.
"""

from kneeoa import moved as _moved

__version__ = "0.1.0"
__all__ = ["Grader", "InputFile", "builtin_models", "load_model", "__version__"]

_LAZY = {"Grader": "kneeoa.api", "builtin_models": "kneeoa.api", "load_model": "kneeoa.api",
         "InputFile": "kneeoa.deploy.inputs"}


_moved.install()  # old import paths (kneeoa.data.dicom, kneeoa.cam, ...) keep working for one release


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kneeoa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
