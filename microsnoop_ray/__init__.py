"""microsnoop-ray: Microsnoop profiles of microscopy images, from one cell to a whole screen.

The core is plain functions on arrays and DataFrames; Ray appears only in
:mod:`microsnoop_ray.pipeline` and the jobs.
"""
from .model import load_model, save_model, MicrosnoopUNet, ModelCard
from .encode.embed import embed, Encoder, feature_names
from .errors import InputError, WeightsError, MicrosnoopError
from .profiles.aggregate import feature_columns

__version__ = "0.1.0"
__all__ = [
    "load_model", "save_model", "MicrosnoopUNet", "ModelCard",
    "embed", "Encoder", "feature_names", "feature_columns",
    "InputError", "WeightsError", "MicrosnoopError",
]
