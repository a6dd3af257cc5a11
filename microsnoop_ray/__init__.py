"""microsnoop-ray: Microsnoop profiles of microscopy images, from one cell to a whole screen.

The core is plain functions on arrays and DataFrames; Ray appears only in
:mod:`microsnoop_ray.pipeline` and the jobs.

The public names load on first use (as in scikit-image and SciPy): a Ray worker that only reads
and crops imports this package without loading torch, which costs seconds of CPU per process.
"""
from __future__ import annotations

import importlib

from .errors import InputError, MicrosnoopError, WeightsError

__version__ = "0.1.0"


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]):
    """``(__getattr__, __dir__, names)`` for ``package``, whose ``modules`` (relative names) export
    ``names``: each module is imported when one of its names is first asked for."""
    where = {name: module for module, names in modules.items() for name in names}

    def getattr_(name: str):
        if name in where:
            return getattr(importlib.import_module(f".{where[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def dir_() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(where))

    return getattr_, dir_, list(where)


__getattr__, __dir__, _lazy = lazy_exports(__name__, {
    "model": ("load_model", "save_model", "MicrosnoopUNet", "ModelCard"),
    "encode.embed": ("embed", "Encoder", "feature_names"),
    "profiles.aggregate": ("feature_columns",),
})
__all__ = [*_lazy, "InputError", "WeightsError", "MicrosnoopError"]
