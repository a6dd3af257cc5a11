"""Cells and their nuclei: two label images of one field made into one object per cell.

CellProfiler's Cell Painting pipeline grows every cell from its nucleus, so a cell and its nucleus
share one object number. Here nuclei and cells are segmented apart (Cellpose on the nuclei channel,
and on the cytoplasmic channel with the nuclei channel), and then matched: a nucleus belongs to the
cell that covers most of its pixels, if that is at least half of them. A cell that so receives
several nuclei (Cellpose merged touching cells) is divided between them, each pixel to the nearest of
its nuclei, as CellProfiler's propagation from the nuclei would divide it. Cells then carry their
nucleus's number, which stays the object's number (its crop is the cell-region crop around the
nucleus). What finds no partner is reported, never paired by force.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: the share of a nucleus's pixels its cell must cover
MIN_NUCLEUS_COVER = 0.5


@dataclass
class Matched:
    """The result of :func:`match_cells`.

    Attributes
    ----------
    cells : ndarray (H, W) int32
        The matched cells, each labelled with its nucleus's number (0 elsewhere).
    nuclei_without_cell : dict nucleus number -> reason
    cells_without_nucleus : int
        Cells that hold no nucleus of their own (left out).
    cell_of : dict nucleus number -> the cell's number in the cell label image given
    """

    cells: np.ndarray
    nuclei_without_cell: dict[int, str]
    cells_without_nucleus: int
    cell_of: dict[int, int]


def match_cells(nuclei: np.ndarray, cells: np.ndarray, min_cover: float = MIN_NUCLEUS_COVER) -> Matched:
    """Match every cell to the nucleus inside it.

    Parameters
    ----------
    nuclei, cells : ndarray (H, W) int
        Label images of one field (0 = background), numbered independently.
    min_cover : float
        The share of a nucleus's pixels its cell must cover.

    Returns
    -------
    Matched
    """
    nuclei, cells = np.asarray(nuclei, np.int64), np.asarray(cells, np.int64)
    if nuclei.shape != cells.shape:
        raise ValueError(f"nuclei {nuclei.shape} and cells {cells.shape} differ in shape")
    n_nuc, n_cell = int(nuclei.max(initial=0)), int(cells.max(initial=0))
    pairs = np.bincount(nuclei.ravel() * (n_cell + 1) + cells.ravel(),
                        minlength=(n_nuc + 1) * (n_cell + 1)).reshape(n_nuc + 1, n_cell + 1)
    area = pairs.sum(axis=1)
    present = np.flatnonzero(area[1:]) + 1
    best = pairs[:, 1:].argmax(axis=1) + 1
    cover = pairs[np.arange(n_nuc + 1), best]
    missing: dict[int, str] = {}
    nuclei_of: dict[int, list[int]] = {}  # cell -> its nuclei
    for nuc in present:
        if cover[nuc] < min_cover * area[nuc]:
            missing[int(nuc)] = f"nucleus without a cell (a cell covers {cover[nuc] / area[nuc]:.0%} of it)"
        else:
            nuclei_of.setdefault(int(best[nuc]), []).append(int(nuc))
    relabel = np.zeros(n_cell + 1, np.int32)
    for cell, nucs in nuclei_of.items():
        relabel[cell] = nucs[0] if len(nucs) == 1 else 0
    matched = relabel[cells]
    shared = {cell: nucs for cell, nucs in nuclei_of.items() if len(nucs) > 1}
    if shared:
        matched = _divide(matched, nuclei, cells, shared)
    cells_present = int((pairs[:, 1:].sum(axis=0) > 0).sum())
    return Matched(matched, dict(sorted(missing.items())), cells_present - len(nuclei_of),
                   {nuc: cell for cell, nucs in nuclei_of.items() for nuc in nucs})


def _divide(matched: np.ndarray, nuclei: np.ndarray, cells: np.ndarray, shared: dict[int, list[int]]) -> np.ndarray:
    """``matched`` with each shared cell divided among its nuclei: every pixel of it goes to the nearest of
    them (Euclidean, from the nuclei's own pixels)."""
    from scipy import ndimage as ndi

    owner = np.zeros(int(nuclei.max()) + 1, np.int64)
    for cell, nucs in shared.items():
        owner[nucs] = cell
    seeds = np.where(owner[nuclei] > 0, nuclei, 0)
    _, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    nearest = seeds[iy, ix]
    in_shared = np.isin(cells, list(shared)) & (owner[nearest] == cells)
    out = matched.copy()
    out[in_shared] = nearest[in_shared]
    return out
