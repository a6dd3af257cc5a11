"""Padding and percentile normalisation, shared by inference and pretraining.

Faithful to the published pipeline (``docs/METHOD.md`` section 3): every one-channel
image is zero-padded centred to the input size (224, or a data set's own: ``contract.input_size_for``) and *then* normalised with its own
1st and 99th percentiles, computed over the whole padded array with linear
interpolation, without clipping. :func:`check_images` refuses what the encoder cannot take before
anything heavy is loaded.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from .contract import INPUT_SIZE

#: Normalisation modes of :func:`normalize_percentile`.
NORMALIZATION_MODES = ("default", "faithful")


def pad_center(images: np.ndarray, size: int = 224) -> np.ndarray:
    """Zero-pad images centred to ``size`` x ``size``.

    ``top = (size - h) // 2`` and the rest goes to the bottom; likewise left/right.

    Parameters
    ----------
    images : ndarray, shape (..., h, w)
        Any leading dimensions; ``h, w <= size``.
    size : int

    Returns
    -------
    ndarray, shape (..., size, size), float32
    """
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"image of {h}x{w} is larger than {size}x{size}")
    out = np.zeros(images.shape[:-2] + (size, size), dtype=np.float32)
    top, left = (size - h) // 2, (size - w) // 2
    out[..., top:top + h, left:left + w] = images
    return out


def fit_center(images: np.ndarray, size: int) -> np.ndarray:
    """Centre-cut to ``size`` the sides longer than it, then zero-pad centred to ``size`` x ``size``.

    A crop larger than the encoder's input keeps its middle (``(h - size) // 2`` rows cut at the
    top), as the cell-region crop keeps the cell's centre.

    Parameters
    ----------
    images : ndarray, shape (..., h, w)
    size : int

    Returns
    -------
    ndarray, shape (..., size, size), float32
    """
    h, w = images.shape[-2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return pad_center(images[..., top:top + min(h, size), left:left + min(w, size)], size)


def normalize_percentile(x: np.ndarray, mode: str = "default", lower: float = 1.0,
                         upper: float = 99.0) -> np.ndarray:
    """Percentile-normalise each one-channel image: ``(x - P1) / (P99 - P1)``.

    Parameters
    ----------
    x : ndarray, shape (n, h, w), float32
        One-channel images (already padded). Modified copies are returned.
    mode : {"default", "faithful"}
        How the two degenerate cases are handled; ordinary images are treated
        identically by both modes.

        * constant image (max == min): ``faithful`` leaves it unchanged, as the
          reference code does; ``default`` returns zeros (``x - P1``), so an
          all-500 image and an all-zero image give the same embedding.
        * ``P99 == P1`` but not constant (a small bright object in a large
          zero-padded frame, < 1 % of the pixels): the reference divides by
          1e-6, which multiplies values by a million (``faithful`` keeps that);
          ``default`` divides by the largest deviation from P1 instead, so
          values stay in [-1, 1].
    lower, upper : float
        The percentiles (1 and 99 in the method).

    Returns
    -------
    ndarray, shape (n, h, w), float32
    """
    if mode not in NORMALIZATION_MODES:
        raise ValueError(f"normalization mode must be one of {NORMALIZATION_MODES}, not {mode!r}")
    x = np.asarray(x, dtype=np.float32)
    flat = x.reshape(len(x), -1)
    lo, hi = np.percentile(flat, [lower, upper], axis=1).astype(np.float32)
    vmin, vmax = flat.min(axis=1), flat.max(axis=1)
    constant = vmax == vmin
    degenerate = (hi == lo) & ~constant
    scale = hi - lo
    if mode == "faithful":
        scale = np.where(degenerate, np.float32(1e-6), scale)
        shift = np.where(constant, np.float32(0), lo)
        scale = np.where(constant, np.float32(1), scale)
    else:
        spread = np.maximum(vmax - lo, lo - vmin)
        scale = np.where(degenerate, spread, scale)
        shift = lo
        scale = np.where(constant, np.float32(1), scale)
    return (x - shift[:, None, None]) / scale[:, None, None]


def preprocess(images: np.ndarray, size: int = 224, mode: str = "default") -> np.ndarray:
    """Fit (:func:`fit_center`: centre-cut, then pad) and normalise one-channel images.

    Parameters
    ----------
    images : ndarray, shape (n, h, w)

    Returns
    -------
    ndarray, shape (n, size, size), float32
    """
    return normalize_percentile(fit_center(images, size), mode=mode)


def pad_normalize_torch(crops, size: int = 224, mode: str = "default", device=None, pin_memory: bool = False):
    """:func:`preprocess` in torch, batched, on ``device``: crops at their native size and dtype in,
    padded and percentile-normalised planes out. Equal to the NumPy path within 1e-5.

    The crops travel to the device as one flat buffer (float32, pinned when asked, copied
    without blocking) and are padded there, so a crop actor ships a 68 x 68 uint16 crop
    (9 KiB) instead of a 224 x 224 float32 plane (196 KiB).

    Parameters
    ----------
    crops : sequence of ndarray (h, w), any numeric dtype
        Larger than ``size`` on a side: centre-cut there first (:func:`fit_center`).
    size : int
    mode : {"default", "faithful"}
        As :func:`normalize_percentile`.
    device : torch.device or str, optional
    pin_memory : bool
        Stage the host buffer in pinned memory (for CUDA).

    Returns
    -------
    torch.Tensor, shape (n, 1, size, size), float32, on ``device``
    """
    import torch

    if mode not in NORMALIZATION_MODES:
        raise ValueError(f"normalization mode must be one of {NORMALIZATION_MODES}, not {mode!r}")
    device = torch.device(device or "cpu")
    n = len(crops)
    crops = [fit_center(np.asarray(c), size) if max(np.shape(c)) > size else c for c in crops]
    shapes = [np.shape(c) for c in crops]
    flat = np.concatenate([np.asarray(c, np.float32).ravel() for c in crops]) if n else np.zeros(0, np.float32)
    buf = torch.from_numpy(flat)
    if pin_memory and device.type == "cuda":
        buf = buf.pin_memory()
    buf = buf.to(device, non_blocking=True)
    out = torch.zeros((n, size, size), dtype=torch.float32, device=device)
    offset = 0
    for i, (h, w) in enumerate(shapes):
        top, left = (size - h) // 2, (size - w) // 2
        out[i, top:top + h, left:left + w] = buf[offset:offset + h * w].view(h, w)
        offset += h * w
    x = out.view(n, -1)
    q = torch.quantile(x.double(), torch.tensor([0.01, 0.99], dtype=torch.float64, device=device), dim=1)
    lo, hi = q[0].float(), q[1].float()
    vmin, vmax = x.min(dim=1).values, x.max(dim=1).values
    constant = vmax == vmin
    degenerate = (hi == lo) & ~constant
    scale = hi - lo
    one = torch.ones_like(scale)
    if mode == "faithful":
        scale = torch.where(degenerate, torch.full_like(scale, 1e-6), scale)
        shift = torch.where(constant, torch.zeros_like(lo), lo)
    else:
        scale = torch.where(degenerate, torch.maximum(vmax - lo, lo - vmin), scale)
        shift = lo
    scale = torch.where(constant, one, scale)
    return ((out - shift[:, None, None]) / scale[:, None, None])[:, None]


def check_images(images, source: str = "images", size: int = INPUT_SIZE) -> tuple[int, int]:
    """Validate an image stack without reading all of it.

    Parameters
    ----------
    images : array-like (N, C, H, W) or sequence of (C, H, W) arrays
    source : str
        Name of the input, used in error messages (a file path, say).

    Returns
    -------
    (N, C) : tuple of int

    Raises
    ------
    InputError
        Wrong number of dimensions, non-numeric dtype, mixed channel counts, an
        image larger than ``size``, or an empty input.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise InputError(source, "no images")
        shapes = [np.shape(im) for im in images]
        for i, (im, shp) in enumerate(zip(images, shapes)):
            if len(shp) != 3:
                raise InputError(source, f"image {i} has {len(shp)} dimensions, expected 3 (C, H, W)")
            _check_dtype(np.asarray(im).dtype, source)
        chans = {s[0] for s in shapes}
        if len(chans) != 1:
            raise InputError(source, f"images have different channel counts {sorted(chans)}")
        big = [i for i, s in enumerate(shapes) if s[1] > size or s[2] > size]
        if big:
            s = shapes[big[0]]
            raise InputError(source, f"image {big[0]} is {s[1]}x{s[2]}, larger than {size}x{size}: "
                                     "use tile or rescale mode (`microsnoop-ray fields --mode tiles|rescale`)")
        return len(images), shapes[0][0]
    shape = getattr(images, "shape", None)
    if shape is None:
        raise InputError(source, f"expected an array of shape (N, C, H, W), got {type(images).__name__}")
    if len(shape) != 4:
        raise InputError(source, f"array has {len(shape)} dimensions {tuple(shape)}, expected 4 (N, C, H, W)")
    _check_dtype(np.dtype(images.dtype), source)
    n, c, h, w = shape
    if n == 0 or c == 0:
        raise InputError(source, f"array of shape {tuple(shape)} holds no images")
    if h > size or w > size:
        raise InputError(source, f"images are {h}x{w}, larger than {size}x{size}: "
                                 "use tile or rescale mode (`microsnoop-ray fields --mode tiles|rescale`)")
    return n, c


def _check_dtype(dtype: np.dtype, source: str) -> None:
    if dtype.kind not in "uif":
        raise InputError(source, f"pixel type {dtype} is not numeric (expected integer or float)")
