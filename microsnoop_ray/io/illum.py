"""Illumination correction of raw fields, before segmentation and cropping.

The functions are estimated as CellProfiler's standard illumination pipeline does
(``CorrectIlluminationCalculate``: regular intensities, all images of a plate, median
smoothing, rescaled by a robust minimum; ``CorrectIlluminationApply``: divide):

1. the mean of every field of one plate and channel (a running sum: memory is one
   float64 image per channel, whatever the plate's size);
2. block-averaged by ``downscale`` (CellProfiler's "resize by" speed-up);
3. median-filtered with a window of ``smoothing`` times the image's longer side;
4. divided by its robust minimum (the 2nd percentile), so the function is >= ~1 and a
   corrected image keeps the scale of the brightest region;
5. resized back to the field's shape; ``corrected = image / function``.

Files follow the Cell Painting Gallery: ``illum/<plate>/<plate>_Illum<Channel>.npy``
(float32, the field's shape), with a PNG of each beside it.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from .arrays import load_array


class IllumAccumulator:
    """Running per-channel sum of a plate's fields (C, H, W); fields of another shape are refused."""

    def __init__(self):
        self.total: np.ndarray | None = None
        self.n = 0

    def add(self, image: np.ndarray) -> None:
        image = np.asarray(image, np.float64)
        if self.total is None:
            self.total = np.zeros_like(image)
        elif image.shape != self.total.shape:
            raise InputError("illumination", f"field of shape {image.shape}, the plate's others are "
                                             f"{self.total.shape}")
        self.total += image
        self.n += 1

    def functions(self, **kw) -> np.ndarray:
        """(C, H, W) float32 illumination functions from the fields added so far."""
        if not self.n:
            raise InputError("illumination", "no readable field to estimate the illumination from")
        return np.stack([illum_function(plane / self.n, **kw) for plane in self.total])


def illum_function(mean_image: np.ndarray, downscale: int = 4, smoothing: float = 1 / 20,
                   robust_percentile: float = 2.0) -> np.ndarray:
    """The illumination function (H, W) float32 of one channel's mean image (steps 2-5 above)."""
    from scipy import ndimage as ndi
    from skimage.transform import resize

    m = np.asarray(mean_image, np.float64)
    h, w = m.shape
    f = max(1, int(downscale))
    hs, ws = h // f, w // f
    small = m[:hs * f, :ws * f].reshape(hs, f, ws, f).mean(axis=(1, 3)) if f > 1 else m
    size = max(3, int(round(max(hs, ws) * smoothing)) | 1)
    smooth = ndi.median_filter(small, size=size, mode="reflect")
    low = np.percentile(smooth, robust_percentile)
    if not low > 0:
        positive = smooth[smooth > 0]
        if positive.size == 0:  # an empty channel: no correction
            return np.ones((h, w), np.float32)
        low = positive.min()
    func = np.maximum(smooth / low, 1.0)
    return resize(func, (h, w), order=1, mode="edge", anti_aliasing=False).astype(np.float32)


def correct(image: np.ndarray, functions: np.ndarray) -> np.ndarray:
    """``image / function`` per channel: (C, H, W) -> float32."""
    if image.shape != functions.shape:
        raise InputError("illumination", f"field of shape {image.shape} but illumination functions of "
                                         f"shape {functions.shape}")
    return (np.asarray(image, np.float32) / functions).astype(np.float32)


def illum_paths(folder: str | Path, plate: str, channels: Sequence[str]) -> list[Path]:
    """``<folder>/<plate>/<plate>_Illum<Channel>.npy`` for each channel (Cell Painting Gallery names)."""
    return [Path(folder) / plate / f"{plate}_Illum{ch}.npy" for ch in channels]


def save_functions(folder: str | Path, plate: str, channels: Sequence[str], functions: np.ndarray) -> list[Path]:
    """Write each channel's function as ``.npy`` (atomically) and a PNG beside it."""
    from ..plots import new_figure, save_figure
    from .atomic import atomic_path

    paths = illum_paths(folder, plate, channels)
    for path, ch, func in zip(paths, channels, functions):
        with atomic_path(path, suffix=".npy") as tmp:
            np.save(tmp, func.astype(np.float32))
        fig = new_figure(figsize=(4.5, 4))
        ax = fig.add_subplot()
        im = ax.imshow(func, cmap="magma")
        ax.set_title(f"{plate} {ch}: illumination function", fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, shrink=0.8)
        save_figure(fig, path.with_suffix(".png"))
    return paths


@functools.lru_cache(maxsize=4)
def _load(paths: tuple[str, ...]) -> np.ndarray:
    return np.stack([load_array(p, mmap=False).astype(np.float32) for p in paths])


def load_functions(paths: Sequence[str | Path]) -> np.ndarray:
    """(C, H, W) functions from one file per channel (cached per process); a missing or bad file is named."""
    for p in paths:
        if not Path(p).is_file():
            raise InputError(p, "illumination function file does not exist")
    funcs = _load(tuple(str(p) for p in paths))
    if not np.isfinite(funcs).all() or (funcs <= 0).any():
        raise InputError(paths[0], "illumination functions must be finite and positive")
    return funcs


def flatness(images: Sequence[np.ndarray] | np.ndarray, grid: int = 8) -> float:
    """How uneven the field-averaged intensity is across the image: the coefficient of variation
    (SD / mean) of the mean image averaged over a ``grid`` x ``grid`` block layout. 0 is perfectly flat.

    Parameters
    ----------
    images : (n, H, W) one channel of n fields
    """
    mean = np.mean(np.asarray(images, np.float64), axis=0)
    h, w = mean.shape
    bh, bw = h // grid, w // grid
    blocks = mean[:bh * grid, :bw * grid].reshape(grid, bh, grid, bw).mean(axis=(1, 3))
    return float(blocks.std() / blocks.mean())
