"""The Microsnoop network and its checkpoints.

The network and checkpoint names load on first use (they need torch); the contract's numbers do not.
"""
from __future__ import annotations

from .. import lazy_exports
from .contract import EMBED_DIM, INPUT_SIZE, WIDTHS, input_size_for

__getattr__, __dir__, _lazy = lazy_exports(__name__, {
    "unet": ("MicrosnoopUNet", "Encoder", "Decoder", "count_parameters"),
    "load": ("load_model", "save_model", "save_random_init", "weights_hash", "ModelCard", "default_weights_path",
             "mae_weights_path"),
})
__all__ = ["EMBED_DIM", "INPUT_SIZE", "WIDTHS", "input_size_for", *_lazy]
