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
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in TIFF_SUFFIXES)
        if not files:
            raise InputError(path, "folder holds no .tif/.tiff files")
        images = [read_tiff(f) for f in files]
        return images, pd.DataFrame({"Metadata_FileName": [f.name for f in files]})
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            images = np.load(path, mmap_mode="r", allow_pickle=False)
            return images, pd.DataFrame(index=range(len(images)) if images.ndim else range(0))
        if suffix == ".npz":
            data = np.load(path, allow_pickle=False)
            if "images" not in data.files:
                raise InputError(path, f"no key 'images' in the .npz (keys: {', '.join(data.files) or 'none'})")
            images = data["images"]
            n = len(images) if images.ndim else 0
            meta = {}
            for key in data.files:
                if key == "images":
                    continue
                arr = data[key]
                if arr.ndim == 1 and len(arr) == n:
                    name = key if key.startswith("Metadata_") else f"Metadata_{key}"
                    meta[name] = arr
            return images, pd.DataFrame(meta, index=range(n))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"cannot read ({type(exc).__name__}: {exc})") from None
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
