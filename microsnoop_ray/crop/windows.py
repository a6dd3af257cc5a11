"""Cell-region crops, tiles and rescaling of whole fields (pure NumPy).

Follows ``docs/METHOD.md`` section 4. All functions take channel-first images
``(C, H, W)`` and return crops ``(M, C, size, size)`` ready for
:func:`microsnoop_ray.embed`.

Border modes of :func:`crop_cells`
----------------------------------
``"drop"`` (default)
    Drop every object whose bounding box touches any image edge (its crop would
    show a cut cell).
``"faithful"``
    The reference behaviour: drop objects touching the top or left edge only
    (its test compares the inclusive bottom/right coordinate with H/W, which can
    never be equal), keep the rest. Use it to reproduce published embeddings.
``"keep"``
    Keep every object; windows are clipped at the border as always.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import ndimage

from ..model.preprocess import pad_center

BORDER_MODES = ("drop", "faithful", "keep")
#: Side of the encoder's input, to which every crop is padded (the model card's ``input_size``).
CROP_SIZE = 224
#: Rc of the cell-region window (docs/METHOD.md section 4): 2.5 by default, 2 for BBBC021, 1 for LIVECell.
RESCALE_CONSTANT = 2.5
#: Overlap of neighbouring tiles in tile mode, as a fraction of the tile.
TILE_OVERLAP = 0.1


def as_chw(image: np.ndarray) -> np.ndarray:
    """View an (H, W) or (C, H, W) image as (C, H, W)."""
    image = np.asarray(image)
    return image[None] if image.ndim == 2 else image


def object_bboxes(labels: np.ndarray) -> pd.DataFrame:
    """Inclusive bounding boxes of the objects of a label image.

    Parameters
    ----------
    labels : ndarray (H, W) of int
        0 is background.

    Returns
    -------
    DataFrame with columns ``label, r0, c0, r1, c1, area`` (r1, c1 inclusive),
    one row per label present, in increasing label order.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"label image must be 2-D, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"label image must be integer, got {labels.dtype}")
    ids = np.unique(labels)
    ids = ids[ids > 0]
    rows = []
    if len(ids):
        slices = ndimage.find_objects(labels, max_label=int(ids.max()))
        areas = np.bincount(labels.ravel(), minlength=int(ids.max()) + 1)
        for i in ids:
            sl = slices[i - 1]
            rows.append((int(i), sl[0].start, sl[1].start, sl[0].stop - 1, sl[1].stop - 1, int(areas[i])))
    return pd.DataFrame(rows, columns=["label", "r0", "c0", "r1", "c1", "area"])


def crop_windows(bboxes: pd.DataFrame, shape: tuple[int, int], rescale_constant: float = RESCALE_CONSTANT,
                 size: int = CROP_SIZE) -> pd.DataFrame:
    """The cell-region window of every object (``docs/METHOD.md`` section 4, step 2).

    ``L = max(r1 - r0, c1 - c0)``, centre ``rc = r0 + (r1 - r0) // 2`` (same for
    columns), half-size ``h = min(L * Rc, size // 2)``, window rows
    ``[max(int(rc - h), 0), min(int(rc + h), H))``: clipped, not shifted.

    Returns
    -------
    DataFrame: the input columns plus ``center_r, center_c, half, top, bottom, left, right``
    (bottom/right exclusive).
    """
    H, W = shape
    out = bboxes.copy()
    r0, c0, r1, c1 = (out[k].to_numpy(dtype=np.int64) for k in ("r0", "c0", "r1", "c1"))
    L = np.maximum(r1 - r0, c1 - c0)
    rc = r0 + (r1 - r0) // 2
    cc = c0 + (c1 - c0) // 2
    half = np.minimum(L * float(rescale_constant), size // 2)
    trunc = lambda v: np.trunc(v).astype(np.int64)  # Python int(): toward zero
    out["center_r"], out["center_c"], out["half"] = rc, cc, half
    out["top"] = np.maximum(trunc(rc - half), 0)
    out["bottom"] = np.minimum(trunc(rc + half), H)
    out["left"] = np.maximum(trunc(cc - half), 0)
    out["right"] = np.minimum(trunc(cc + half), W)
    return out


def touches_border(bboxes: pd.DataFrame, shape: tuple[int, int], mode: str = "drop") -> np.ndarray:
    """Boolean mask of the objects that ``mode`` drops at the image border."""
    if mode not in BORDER_MODES:
        raise ValueError(f"border mode must be one of {BORDER_MODES}, not {mode!r}")
    H, W = shape
    r0, c0, r1, c1 = (bboxes[k].to_numpy() for k in ("r0", "c0", "r1", "c1"))
    if mode == "keep":
        return np.zeros(len(bboxes), dtype=bool)
    if mode == "faithful":
        return (r0 == 0) | (c0 == 0) | (r1 == H) | (c1 == W)
    return (r0 == 0) | (c0 == 0) | (r1 == H - 1) | (c1 == W - 1)


def bboxes_from_centres(x: np.ndarray, y: np.ndarray, object_size: float, shape: tuple[int, int],
                        labels: np.ndarray | None = None) -> pd.DataFrame:
    """Bounding boxes of ``object_size`` around supplied object centres (no segmentation).

    For users who have nucleus centres from CellProfiler (as DeepProfiler
    does): each object becomes a square box of side ``object_size`` centred on
    (x, y) = (column, row), clipped to the image, so that the window of
    :func:`crop_windows` is centre +- ``min(object_size * Rc, 112)``.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    half = float(object_size) / 2
    H, W = shape
    r0 = np.clip(np.round(y - half), 0, H - 1).astype(np.int64)
    r1 = np.clip(np.round(y + half), 0, H - 1).astype(np.int64)
    c0 = np.clip(np.round(x - half), 0, W - 1).astype(np.int64)
    c1 = np.clip(np.round(x + half), 0, W - 1).astype(np.int64)
    ids = np.arange(1, len(x) + 1) if labels is None else np.asarray(labels)
    return pd.DataFrame({"label": ids, "r0": r0, "c0": c0, "r1": r1, "c1": c1,
                         "area": np.full(len(x), int(round(object_size ** 2)))})


def crop_cells(image: np.ndarray, labels: np.ndarray | None = None, rescale_constant: float = RESCALE_CONSTANT, size: int = CROP_SIZE,
               border: str = "drop", min_window: int = 2, bboxes: pd.DataFrame | None = None,
               ) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """Cell-region crops of every object, all channels, zero-padded centred.

    Parameters
    ----------
    image : ndarray (C, H, W) or (H, W)
    labels : ndarray (H, W) of int, 0 = background
        The mask source; or give ``bboxes`` instead (e.g. from
        :func:`bboxes_from_centres`).
    rescale_constant : float
        Rc: 2.5 by default, 2 for BBBC021, 1 for LIVECell/TissueNet.
    size : int
        Side of the padded crops (224).
    border : {"drop", "faithful", "keep"}
        See the module docstring.
    min_window : int
        Objects whose window is narrower than this in either direction (a
        one-pixel object gives an empty window) are reported, not cropped.

    Returns
    -------
    crops : ndarray (M, C, size, size), float32
    table : DataFrame, M rows: ``Metadata_ObjectNumber`` (the label),
        ``Metadata_Location_Center_X/Y`` (the window centre, column/row),
        ``Metadata_Crop_Top/Bottom/Left/Right`` (window, bottom/right exclusive),
        ``Metadata_Object_Area``.
    rejected : DataFrame: ``Metadata_ObjectNumber`` and ``reason`` for every
        object not cropped (border, too small).
    """
    image = as_chw(image)
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W) or (H, W), got shape {image.shape}")
    shape = image.shape[1:]
    if bboxes is None:
        labels = np.asarray(labels)
        if labels.shape != shape:
            raise ValueError(f"labels {labels.shape} do not match image {shape}")
        boxes = object_bboxes(labels)
    else:
        boxes = bboxes.reset_index(drop=True)
    at_border = touches_border(boxes, shape, border)
    win = crop_windows(boxes, shape, rescale_constant, size)
    small = ((win["bottom"] - win["top"]) < min_window) | ((win["right"] - win["left"]) < min_window)
    keep = ~at_border & ~small.to_numpy()
    reasons = np.where(at_border, f"touches the image border (border mode '{border}')",
                       f"window narrower than {min_window} px (object too small to crop)")
    rejected = pd.DataFrame({"Metadata_ObjectNumber": boxes["label"].to_numpy()[~keep],
                             "reason": reasons[~keep]})
    win = win[keep].reset_index(drop=True)
    crops = np.zeros((len(win), image.shape[0], size, size), dtype=np.float32)
    for i, w in enumerate(win.itertuples(index=False)):
        crops[i] = pad_center(image[:, w.top:w.bottom, w.left:w.right], size)
    return crops, _window_table(win), rejected


def _window_table(win: pd.DataFrame) -> pd.DataFrame:
    """The per-object columns of :func:`crop_cells` from its kept windows."""
    return pd.DataFrame({
        "Metadata_ObjectNumber": win["label"].astype(np.int64),
        "Metadata_Location_Center_X": win["center_c"].astype(np.float64),
        "Metadata_Location_Center_Y": win["center_r"].astype(np.float64),
        "Metadata_Crop_Top": win["top"], "Metadata_Crop_Bottom": win["bottom"],
        "Metadata_Crop_Left": win["left"], "Metadata_Crop_Right": win["right"],
        "Metadata_Object_Area": win["area"],
    })


def tile_starts(side: int, size: int = CROP_SIZE, overlap: float = TILE_OVERLAP) -> np.ndarray:
    """Tile origins along one axis: ``n = ceil((1 + 2*overlap) * side / size)`` evenly spaced."""
    overlap = float(np.clip(overlap, 0.05, 0.5))
    if side <= size:
        return np.array([0])
    n = math.ceil((1.0 + 2.0 * overlap) * side / size)
    return np.linspace(0, side - size, n).astype(int)


def tile_field(image: np.ndarray, size: int = CROP_SIZE, overlap: float = TILE_OVERLAP) -> tuple[np.ndarray, pd.DataFrame]:
    """Cut a field into overlapping ``size`` x ``size`` tiles (tile mode).

    A side of at most ``size`` gives one tile covering it (zero-padded centred
    to ``size`` by the embedding step).

    Returns
    -------
    tiles : ndarray (T, C, min(H, size), min(W, size)), same dtype as the image
    table : DataFrame with ``Metadata_Tile_Y``, ``Metadata_Tile_X`` (origins)
    """
    image = as_chw(image)
    _, H, W = image.shape
    ys, xs = tile_starts(H, size, overlap), tile_starts(W, size, overlap)
    th, tw = min(H, size), min(W, size)
    tiles = np.stack([image[:, y:y + th, x:x + tw] for y in ys for x in xs])
    table = pd.DataFrame([(int(y), int(x)) for y in ys for x in xs], columns=["Metadata_Tile_Y", "Metadata_Tile_X"])
    return tiles, table


def rescale_field(image: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Rescaling mode: zero-pad the shorter side centred to a square, then bilinear resize to ``size``.

    Returns
    -------
    ndarray (C, size, size), float32
    """
    import cv2

    image = as_chw(image)
    square = pad_center(image, max(image.shape[1:]))
    return np.stack([cv2.resize(plane, (size, size), interpolation=cv2.INTER_LINEAR) for plane in square])
