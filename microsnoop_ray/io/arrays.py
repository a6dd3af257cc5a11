"""Image stacks from .npy / .npz files and folders of TIFFs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError

TIFF_SUFFIXES = (".tif", ".tiff")


def read_tiff(path: str | Path) -> np.ndarray:
    """Read a TIFF as (C, H, W): 2-D images get C = 1, (H, W, C<=4) RGB-like images are moved to (C, H, W)."""
    import tifffile

    try:
        arr = tifffile.imread(str(path))
    except Exception as exc:
        raise InputError(path, f"cannot read TIFF ({exc})") from None
    arr = np.squeeze(arr) if arr.ndim > 3 else arr
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        if arr.shape[-1] <= 4 < arr.shape[0]:
            return np.moveaxis(arr, -1, 0)
        return arr
    raise InputError(path, f"TIFF has shape {arr.shape}; expected (H, W) or (C, H, W)")


def load_array(path: str | Path, key: str = "images", mmap: bool = True) -> np.ndarray:
    """The one reader of ``.npy`` / ``.npz`` arrays in this package.

    Parameters
    ----------
    path : str or Path
        ``.npy`` (memory-mapped when ``mmap``: a worker reads only the rows it needs) or ``.npz``
        (the array under ``key`` is loaded whole; store arrays larger than memory as ``.npy``).
    key : str
        The ``.npz`` member.

    Returns
    -------
    ndarray, as stored (never pickled objects)

    Raises
    ------
    InputError
        Naming the file: missing, unreadable, or without ``key`` (the keys it has are listed).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "array file does not exist")
    try:
        data = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            return data
        with data:
            if key not in data.files:
                raise InputError(path, f"no key {key!r} in the .npz (keys: {', '.join(data.files) or 'none'})")
            return data[key]
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"cannot read array ({type(exc).__name__}: {exc})") from None


def npz_columns(path: str | Path, n: int, skip: str = "images") -> dict[str, np.ndarray]:
    """The 1-D members of length ``n`` of an ``.npz`` (per-image metadata beside ``images``)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files if k != skip and data[k].ndim == 1 and len(data[k]) == n}
