"""Cells and their nuclei: two label images of one field made into one object per cell.

CellProfiler's Cell Painting pipeline grows every cell from its nucleus, so a cell and its nucleus
share one object number. Here nuclei and cells are segmented apart (Cellpose on the nuclei channel,
and on the cytoplasmic channel with the nuclei channel), and then matched: a nucleus belongs to the
cell that covers most of its pixels, if that is at least half of them; a cell that so receives
several nuclei keeps the one it covers most. Cells then carry their nucleus's number, which stays
the object's number (its crop is the cell-region crop around the nucleus). What finds no partner is
reported, never paired by force.
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
    owner: dict[int, int] = {}  # cell -> its nucleus
    missing: dict[int, str] = {}
    for nuc in present:
        if cover[nuc] < min_cover * area[nuc]:
            missing[int(nuc)] = f"nucleus without a cell (a cell covers {cover[nuc] / area[nuc]:.0%} of it)"
            continue
        cell = int(best[nuc])
        rival = owner.get(cell)
        if rival is None or cover[nuc] > cover[rival]:
            if rival is not None:
                missing[rival] = "nucleus without a cell (its cell holds a larger share of another nucleus)"
            owner[cell] = int(nuc)
        else:
            missing[int(nuc)] = "nucleus without a cell (its cell holds a larger share of another nucleus)"
    relabel = np.zeros(n_cell + 1, np.int32)
    for cell, nuc in owner.items():
        relabel[cell] = nuc
    cells_present = int((pairs[:, 1:].sum(axis=0) > 0).sum())
    return Matched(relabel[cells], dict(sorted(missing.items())), cells_present - len(owner),
                   {nuc: cell for cell, nuc in owner.items()})
