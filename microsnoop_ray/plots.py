"""Every picture the package draws, on matplotlib Figures that belong to no pyplot window:
segmentation outlines and crop windows on a field, the plate layout of cell counts, PCA and
UMAP maps of profiles."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .profiles.aggregate import feature_columns


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


def plate_layout_png(wells: pd.DataFrame, path: str | Path, title: str = "",
                     skipped: Sequence[str] = ()) -> Path:
    """A plate heat map of ``Metadata_Object_Count`` per well, counts written in the wells.

    ``skipped`` wells (no profile) are drawn hatched.
    """
    from matplotlib.patches import Rectangle

    rows = sorted(set(wells["Metadata_Row"]) | {w[0] for w in skipped}, key=lambda r: (len(r), r))
    cols = sorted(set(int(c) for c in wells["Metadata_Column"]) | {int(w[1:]) for w in skipped})
    grid = np.full((len(rows), len(cols)), np.nan)
    for r in wells.itertuples():
        grid[rows.index(r.Metadata_Row), cols.index(int(r.Metadata_Column))] = r.Metadata_Object_Count
    fig = new_figure(figsize=(1.0 + 0.55 * len(cols), 1.0 + 0.5 * len(rows)))
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="viridis")
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = grid[i, j]
            ax.text(j, i, "-" if np.isnan(v) else f"{int(v)}", ha="center", va="center", fontsize=7,
                    color="white" if np.isnan(v) or v < np.nanmax(grid) * 0.6 else "black")
    for w in skipped:
        if w[0] in rows and int(w[1:]) in cols:
            ax.add_patch(Rectangle((cols.index(int(w[1:])) - 0.5, rows.index(w[0]) - 0.5), 1, 1, fill=False,
                                       hatch="///", edgecolor="red"))
    ax.set_xticks(range(len(cols)), [f"{c:02d}" for c in cols], fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(title or "cells per well", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, label="cells")
    return save_figure(fig, path, dpi=110)


def pca(X: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Principal components of standardised features: (scores (n, k), explained variance ratios (k,))."""
    X = np.asarray(X, np.float64)
    sd = X.std(axis=0)
    Z = (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    U, S, _ = np.linalg.svd(Z, full_matrices=False)
    var = S ** 2 / max(1e-12, (S ** 2).sum())
    return U[:, :k] * S[:k], var[:k]


def pca_png(profiles: pd.DataFrame, color_by: str, path: str | Path, title: str = "") -> Path:
    """Scatter of the first two principal components of the profiles, coloured by a metadata column."""
    import matplotlib

    scores, var = pca(profiles[feature_columns(profiles)].to_numpy())
    labels = profiles[color_by].astype(str).to_numpy()
    fig = new_figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    for i, lab in enumerate(sorted(set(labels))):
        m = labels == lab
        ax.scatter(scores[m, 0], scores[m, 1], s=28, label=lab, color=matplotlib.colormaps["tab10"](i % 10))
    ax.set_xlabel(f"PC1 ({var[0]:.0%})")
    ax.set_ylabel(f"PC2 ({var[1]:.0%})" if len(var) > 1 else "PC2")
    ax.legend(fontsize=7, title=color_by.removeprefix("Metadata_"), title_fontsize=7)
    ax.set_title(title or "well profiles", fontsize=9)
    return save_figure(fig, path)


def embedding_2d(X: np.ndarray, method: str = "umap", seed: int = 0) -> tuple[np.ndarray, str]:
    """(n, d) -> (n, 2) coordinates and a description. ``umap`` (umap-learn, cosine) falls back to PCA
    below 10 points, where UMAP is not defined."""
    X = np.asarray(X, np.float64)
    if method == "umap" and len(X) >= 10:
        import warnings

        import umap

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reducer = umap.UMAP(n_neighbors=min(15, len(X) - 1), metric="cosine", random_state=seed)
            return reducer.fit_transform(X), "UMAP (cosine, 15 neighbours)"
    if method not in ("umap", "pca"):
        raise ValueError(f"method must be 'umap' or 'pca', not {method!r}")
    scores, var = pca(X, 2)
    return scores, f"PCA of standardised features ({100 * var.sum():.0f}% of variance)"


def embedding_png(X: np.ndarray, labels: np.ndarray, path: str | Path, title: str = "", method: str = "umap",
                  seed: int = 0) -> Path:
    """Scatter of the 2-D map of ``X`` (n, d) coloured by ``labels`` (n,), legend by label."""
    import matplotlib

    xy, how = embedding_2d(X, method, seed)
    labels = np.asarray(labels).astype(str)
    fig = new_figure(figsize=(6.2, 5.0))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab20" if len(np.unique(labels)) > 10 else "tab10"]
    for i, lab in enumerate(np.unique(labels)):
        sel = labels == lab
        ax.scatter(xy[sel, 0], xy[sel, 1], s=8 if len(xy) > 200 else 22, color=cmap(i % cmap.N), label=lab,
                   alpha=0.75, linewidths=0)
    ax.set_title(f"{title}\n{how}" if title else how, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, markerscale=1.5, loc="best", ncol=1 if len(np.unique(labels)) <= 12 else 2)
    return save_figure(fig, path, dpi=110)
