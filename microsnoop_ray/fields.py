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
from .model import EMBED_DIM

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
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    image = as_chw(image)
    dim = EMBED_DIM * image.shape[0]
    if image.dtype.kind not in "uif":
        return _skipped(f"{where}: pixel type {image.dtype} is not numeric", dim)
    if not np.isfinite(image).all():
        return _skipped(f"{where}: field has NaN or infinite pixels", dim)
    if image.size == 0 or image.max() == image.min():
        return _skipped(f"{where}: field is constant (every pixel {image.flat[0] if image.size else 'n/a'})", dim)
    kw = dict(encoder=encoder, batch_size=batch_size, normalization=normalization, source=where)
    if mode == "cells":
        if labels is None and bboxes is None:
            raise ValueError("cells mode needs labels or bboxes")
        crops, table, rejected = crop_cells(image, labels, rescale_constant=rescale_constant, border=border,
                                            bboxes=bboxes)
        if len(crops) == 0:
            found = len(rejected)
            why = "no objects found" if found == 0 else f"all {found} objects rejected ({rejected['reason'].iloc[0]})"
            return _skipped(f"{where}: no cells to profile: {why}", dim, rejected)
        feats = embed(crops, **kw)
        return FieldResult(table, feats, feats.mean(axis=0), len(crops), rejected)
    if mode == "tiles":
        tiles, table = tile_field(image, overlap=tile_overlap)
        feats = embed(tiles, **kw)
        return FieldResult(table, feats, feats.mean(axis=0), len(tiles), pd.DataFrame())
    feats = embed(rescale_field(image)[None], **kw)
    return FieldResult(pd.DataFrame(index=[0]), feats, feats[0], 1, pd.DataFrame())
