"""Pictures of an evaluation: a 2-D map of the profiles coloured by label (UMAP or PCA)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..qc import new_figure, save_figure
from ..report import pca


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
