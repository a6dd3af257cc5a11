"""The Microsnoop network and its checkpoints.

The network and checkpoint names load on first use (they need torch); the contract's numbers do not.
"""
from __future__ import annotations

import importlib

from .contract import EMBED_DIM, INPUT_SIZE, WIDTHS

_LAZY = {
    "unet": ("MicrosnoopUNet", "Encoder", "Decoder", "count_parameters"),
    "load": ("load_model", "save_model", "save_random_init", "weights_hash", "ModelCard", "default_weights_path",
             "mae_weights_path"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["EMBED_DIM", "INPUT_SIZE", "WIDTHS", *_WHERE]


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
