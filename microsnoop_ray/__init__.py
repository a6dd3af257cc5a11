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

_LAZY = {
    "model": ("load_model", "save_model", "MicrosnoopUNet", "ModelCard"),
    "encode.embed": ("embed", "Encoder", "feature_names"),
    "profiles.aggregate": ("feature_columns",),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = [*_WHERE, "InputError", "WeightsError", "MicrosnoopError"]


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
