"""Pictures a person checks at a glance: segmentation outlines and crop windows on a field."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def draw_field(plane: np.ndarray, path: str | Path, labels: np.ndarray | None = None,
               windows: pd.DataFrame | None = None, title: str = "") -> Path:
    """Write a PNG of one channel with object outlines (red) and crop windows (yellow).

    Parameters
    ----------
    plane : ndarray (H, W)
    labels : ndarray (H, W) int, optional
    windows : DataFrame with ``Metadata_Crop_Top/Bottom/Left/Right`` and
        ``Metadata_Location_Center_X/Y``, optional
    """
    from matplotlib.patches import Rectangle

    plane = np.asarray(plane, dtype=np.float32)
    lo, hi = np.percentile(plane, [1, 99.5])
    rgb = np.repeat(np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1)[..., None], 3, axis=2)
    if labels is not None and labels.max() > 0:
        from skimage.segmentation import find_boundaries
        rgb[find_boundaries(labels, mode="inner")] = (1.0, 0.15, 0.15)
    h, w = plane.shape
    fig = new_figure(figsize=(7, 7 * h / max(w, 1)), dpi=110)
    ax = fig.subplots()
    ax.imshow(rgb, interpolation="nearest")
    if windows is not None:
        for r in windows.itertuples(index=False):
            ax.add_patch(Rectangle((r.Metadata_Crop_Left - 0.5, r.Metadata_Crop_Top - 0.5),
                                   r.Metadata_Crop_Right - r.Metadata_Crop_Left,
                                   r.Metadata_Crop_Bottom - r.Metadata_Crop_Top, fill=False, lw=0.6, ec="yellow"))
            ax.plot(r.Metadata_Location_Center_X, r.Metadata_Location_Center_Y, "+", color="cyan", ms=3)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return save_figure(fig, path, dpi=110)


def new_figure(**kw):
    """A matplotlib Figure that belongs to no pyplot window: the library never touches the caller's
    backend (a notebook keeps its inline plots), and figures are freed with their last reference."""
    from matplotlib.figure import Figure

    return Figure(**kw)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out and write (creating the folder) a figure made by :func:`new_figure`."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
