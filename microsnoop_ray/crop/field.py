"""Whole fields of view into encoder inputs: cell cropping, tile and rescaling modes.

Pure functions on arrays: segmentation happens before (batched across fields,
see :mod:`microsnoop_ray.segment`); :func:`~microsnoop_ray.encode.embed.embed`
embeds what :func:`prepare_field` cuts. A field that yields no crops (no cells,
NaN pixels, a constant image) gives a reason instead: never a zero vector that
would pollute later aggregation and sphering.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from .windows import CROP_SIZE, RESCALE_CONSTANT, TILE_OVERLAP, as_chw, crop_cells, rescale_field, tile_field

MODES = ("cells", "tiles", "rescale")


@dataclasses.dataclass
class PreparedField:
    """Crops of one field, ready for the encoder (or the reason it has none).

    Attributes
    ----------
    crops : ndarray (M, C, 224, 224) float32 (unnormalised, zero-padded)
    objects : DataFrame, M rows (``Metadata_`` columns: object number or tile, crop window)
    rejected : DataFrame of objects not cropped (``Metadata_ObjectNumber``, ``reason``)
    skip_reason : str or None
    """

    crops: np.ndarray
    objects: pd.DataFrame
    rejected: pd.DataFrame
    skip_reason: str | None = None


def _no_crops(image: np.ndarray, reason: str, rejected: pd.DataFrame | None = None) -> PreparedField:
    empty = np.zeros((0, image.shape[0], CROP_SIZE, CROP_SIZE), np.float32)
    if rejected is None:
        rejected = pd.DataFrame(columns=["Metadata_ObjectNumber", "reason"])
    return PreparedField(empty, pd.DataFrame(), rejected, reason)


def field_problem(image: np.ndarray, where: str = "field") -> str | None:
    """Why a (C, H, W) field cannot be profiled (not numeric, NaN or infinite pixels, constant), or None."""
    if image.dtype.kind not in "uif":
        return f"{where}: pixel type {image.dtype} is not numeric"
    if not np.isfinite(image).all():
        return f"{where}: field has NaN or infinite pixels"
    if image.size == 0 or image.max() == image.min():
        return f"{where}: field is constant (every pixel {image.flat[0] if image.size else 'n/a'})"
    return None


def prepare_field(image: np.ndarray, mode: str = "cells", labels: np.ndarray | None = None,
                  bboxes: pd.DataFrame | None = None, rescale_constant: float = RESCALE_CONSTANT, border: str = "drop",
                  tile_overlap: float = TILE_OVERLAP, where: str = "field") -> PreparedField:
    """Check a field and cut it into encoder inputs (cell crops, tiles or one rescaled image).

    The pipeline's crop stage runs it (in its CPU actors for ``profile``, in this process for
    ``fields``) and sends the crops to the encoder; the field profile is the mean of their
    embeddings.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    image = as_chw(image)
    problem = field_problem(image, where)
    if problem is not None:
        return _no_crops(image, problem)
    if mode == "cells":
        if labels is None and bboxes is None:
            raise ValueError("cells mode needs labels or bboxes")
        crops, table, rejected = crop_cells(image, labels, rescale_constant=rescale_constant, border=border,
                                            bboxes=bboxes)
        if len(crops) == 0:
            found = len(rejected)
            why = "no objects found" if found == 0 else f"all {found} objects rejected ({rejected['reason'].iloc[0]})"
            return _no_crops(image, f"{where}: no cells to profile: {why}", rejected)
        return PreparedField(crops, table, rejected)
    if mode == "tiles":
        tiles, table = tile_field(image, overlap=tile_overlap)
        return PreparedField(tiles, table, pd.DataFrame())
    return PreparedField(rescale_field(image)[None], pd.DataFrame(index=[0]), pd.DataFrame())
