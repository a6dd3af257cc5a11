"""Profiles of whole fields of view: cell cropping, tile and rescaling modes.

Pure functions on arrays: segmentation happens before (batched across fields,
see :mod:`microsnoop_ray.segment`), embedding through an
:class:`~microsnoop_ray.encode.Encoder`. A field that yields no profile (no
cells, NaN pixels, a constant image) gives no row and a reason instead: never a
zero vector that would pollute later aggregation and sphering.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from .crop import as_chw, crop_cells, rescale_field, tile_field
from .encode import Encoder, embed
from .model import EMBED_DIM, INPUT_SIZE

MODES = ("cells", "tiles", "rescale")


@dataclasses.dataclass
class FieldResult:
    """What one field gave.

    Attributes
    ----------
    objects : DataFrame, one row per embedded cell (or tile), ``Metadata_`` columns
    object_features : ndarray (M, 256*C) float32
    field_features : ndarray (256*C,) float32, or None when the field was skipped
    object_count : int
    rejected : DataFrame of objects not cropped (``Metadata_ObjectNumber``, ``reason``)
    skip_reason : str or None
    """

    objects: pd.DataFrame
    object_features: np.ndarray
    field_features: np.ndarray | None
    object_count: int
    rejected: pd.DataFrame
    skip_reason: str | None = None


def _skipped(reason: str, dim: int, rejected: pd.DataFrame | None = None) -> FieldResult:
    return FieldResult(pd.DataFrame(), np.zeros((0, dim), np.float32), None, 0,
                       rejected if rejected is not None else pd.DataFrame(columns=["Metadata_ObjectNumber", "reason"]),
                       reason)


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
    empty = np.zeros((0, image.shape[0], INPUT_SIZE, INPUT_SIZE), np.float32)
    if rejected is None:
        rejected = pd.DataFrame(columns=["Metadata_ObjectNumber", "reason"])
    return PreparedField(empty, pd.DataFrame(), rejected, reason)


def prepare_field(image: np.ndarray, mode: str = "cells", labels: np.ndarray | None = None,
                  bboxes: pd.DataFrame | None = None, rescale_constant: float = 2.5, border: str = "drop",
                  tile_overlap: float = 0.1, where: str = "field") -> PreparedField:
    """Check a field and cut it into encoder inputs (cell crops, tiles or one rescaled image).

    The pure first half of :func:`profile_field`; the plate pipeline runs it in its CPU
    actors and sends the crops to the encoder actors. Parameters as for :func:`profile_field`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    image = as_chw(image)
    if image.dtype.kind not in "uif":
        return _no_crops(image, f"{where}: pixel type {image.dtype} is not numeric")
    if not np.isfinite(image).all():
        return _no_crops(image, f"{where}: field has NaN or infinite pixels")
    if image.size == 0 or image.max() == image.min():
        return _no_crops(image, f"{where}: field is constant (every pixel {image.flat[0] if image.size else 'n/a'})")
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


def profile_field(image: np.ndarray, encoder: Encoder, mode: str = "cells", labels: np.ndarray | None = None,
                  bboxes: pd.DataFrame | None = None, rescale_constant: float = 2.5, border: str = "drop",
                  tile_overlap: float = 0.1, batch_size: int = 32, normalization: str = "default",
                  where: str = "field") -> FieldResult:
    """Embed one field in the chosen mode and average it into a field profile.

    Parameters
    ----------
    image : ndarray (C, H, W), any numeric dtype
    encoder : Encoder
    mode : {"cells", "tiles", "rescale"}
        ``cells``: METHOD.md cell-region crops around each object of ``labels``
        (or ``bboxes``), the field profile is the mean of the cell profiles.
        ``tiles``: overlapping 224 tiles, mean of the tile profiles.
        ``rescale``: pad to a square, resize to 224, embed once.
    labels, bboxes
        Mask source for ``cells`` mode.
    where : str
        Name of the field for the reasons (e.g. ``plate/well/site`` or a file name).

    Returns
    -------
    FieldResult
    """
    image = as_chw(image)
    dim = EMBED_DIM * image.shape[0]
    prep = prepare_field(image, mode, labels, bboxes, rescale_constant, border, tile_overlap, where)
    if prep.skip_reason is not None:
        return _skipped(prep.skip_reason, dim, prep.rejected)
    feats = embed(prep.crops, encoder=encoder, batch_size=batch_size, normalization=normalization, source=where)
    return FieldResult(prep.objects, feats, feats.mean(axis=0), len(prep.crops), prep.rejected)
