"""Reading whole fields of view from single files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from .arrays import load_array, read_tiff
from .tables import read_table


def read_field(path: str | Path) -> np.ndarray:
    """A field as (C, H, W): TIFF (multi-page = channels), PNG/JPEG (grey or RGB; alpha dropped) or .npy."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "image file does not exist")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        return read_tiff(path)
    if suffix == ".npy":
        arr = load_array(path, mmap=False)
    elif suffix in (".png", ".jpg", ".jpeg", ".bmp"):
        import skimage.io

        try:
            arr = skimage.io.imread(path)
        except Exception as exc:
            raise InputError(path, f"cannot read image ({exc})") from None
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):
            arr = np.moveaxis(arr[..., :3], -1, 0)
    else:
        raise InputError(path, f"unsupported image type '{suffix}' (expected .tif, .png, .jpg or .npy)")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputError(path, f"image has shape {arr.shape}; expected (H, W) or (C, H, W)")
    return arr


def read_centres(path: str | Path) -> pd.DataFrame:
    """Object centres: columns ``X``/``Y`` in any CellProfiler spelling, optional ``Metadata_FileName``.

    Returns a DataFrame with ``x``, ``y``, ``label`` and ``file`` (None when absent).
    """
    df = read_table(path)
    for xs, ys in (("Location_Center_X", "Location_Center_Y"), ("AreaShape_Center_X", "AreaShape_Center_Y"),
                   ("Nuclei_Location_Center_X", "Nuclei_Location_Center_Y"), ("X", "Y"), ("x", "y")):
        if xs in df and ys in df:
            break
    else:
        raise InputError(path, "no centre columns (expected Location_Center_X/Y, AreaShape_Center_X/Y or X/Y)")
    label = df["ObjectNumber"] if "ObjectNumber" in df else np.arange(1, len(df) + 1)
    file = df["Metadata_FileName"] if "Metadata_FileName" in df else None
    return pd.DataFrame({"x": df[xs].astype(float), "y": df[ys].astype(float), "label": label,
                         "file": file})
