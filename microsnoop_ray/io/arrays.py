"""Image stacks from .npy / .npz files and folders of TIFFs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

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


def read_image_stack(path: str | Path) -> tuple[object, pd.DataFrame]:
    """Open an image stack for :func:`microsnoop_ray.embed`.

    Parameters
    ----------
    path : str or Path
        ``.npy`` (memory-mapped), ``.npz`` with key ``images`` (other 1-D arrays
        of length N become ``Metadata_<key>`` columns), or a folder of TIFFs
        (sorted by name; ``Metadata_FileName`` is recorded).

    Returns
    -------
    images : ndarray (N, C, H, W) or list of (C, H, W) arrays
    metadata : DataFrame with N rows (possibly no columns)
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file or folder does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES)
        if not files:
            raise InputError(path, "folder holds no .tif/.tiff files")
        images = [read_tiff(f) for f in files]
        return images, pd.DataFrame({"Metadata_FileName": [f.name for f in files]})
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        images = load_array(path)
        n = len(images) if images.ndim else 0
        meta = {} if suffix == ".npy" else npz_columns(path, n)
        meta = {k if k.startswith("Metadata_") else f"Metadata_{k}": v for k, v in meta.items()}
        return images, pd.DataFrame(meta, index=range(n))
    raise InputError(path, f"unsupported input type '{suffix}': expected .npy, .npz or a folder of TIFFs")


def read_metadata_table(path: str | Path, n: int) -> pd.DataFrame:
    """A CSV/Parquet table with one row per image; columns get the ``Metadata_`` prefix."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "metadata table does not exist")
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as exc:
        raise InputError(path, f"cannot read metadata table ({exc})") from None
    if len(df) != n:
        raise InputError(path, f"metadata table has {len(df)} rows but the input has {n} images")
    df.columns = [c if str(c).startswith("Metadata_") else f"Metadata_{c}" for c in df.columns]
    return df.reset_index(drop=True)
