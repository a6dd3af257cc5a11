"""Feature extractors compared side by side on the same cell crops.

Every method maps cell crops ``(n, c, h, w)`` (any numeric dtype) to a feature matrix
``(n, d)`` float32, and is timed:

``microsnoop``
    The network with the given (default: shipped) weights, the faithful embedding.
``random_init``
    The same network with random initialisation (``torch.manual_seed(seed)``).
``cp_measure``
    CellProfiler measurements re-implemented by cp-measure (intensity, texture, granularity,
    radial distribution and Zernikes, size/shape, Feret, correlations) on one object per crop:
    the mask from :func:`~microsnoop_ray.features.cellprofiler.nearest_object_masks`. NaNs are imputed with the column median, constant
    features dropped, and the rest z-scored over the set, as CellProfiler profiles are
    normalised before any comparison.
``pixels_pca``
    The percentile-normalised pixels of every channel, flattened and reduced by PCA (fitted
    on the set itself; no labels) to ``n_components``.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

METHODS = ("microsnoop", "random_init", "cp_measure", "pixels_pca")


def standardize(F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Impute NaN/inf with the column median, drop constant columns, z-score.
    Returns the (n, d') matrix and the boolean mask of kept columns."""
    F = np.asarray(F, np.float64).copy()
    F[~np.isfinite(F)] = np.nan
    F[:, np.isnan(F).all(0)] = 0.0
    med = np.nanmedian(F, axis=0)
    F = np.where(np.isnan(F), med, F)
    sd = F.std(0)
    keep = sd > 1e-12 * np.maximum(1.0, np.abs(F).max(0))
    Z = (F[:, keep] - F[:, keep].mean(0)) / sd[keep]
    return Z.astype(np.float32), keep


def network_features(images: np.ndarray, model, batch_size: int = 48, compile: bool = False,
                     precision: str = "fp32") -> np.ndarray:
    """Microsnoop embeddings (n, 256 * c) of the crops with ``model`` (a MicrosnoopUNet).

    Evaluations use fp32, the reference arithmetic, so that their numbers do not depend on the
    machine (``auto`` would be bf16 on one and fp32 on another)."""
    from ..encode.embed import Encoder, embed

    return embed(images, encoder=Encoder(model, compile=compile, precision=precision), batch_size=batch_size)


def pixels_pca(images: np.ndarray, n_components: int = 256, seed: int = 0) -> np.ndarray:
    """PCA scores (n, k) of the flattened percentile-normalised pixels; k = min(n_components, n - 1, pixels)."""
    from sklearn.decomposition import PCA

    from ..model.preprocess import normalize_percentile

    n, c, h, w = images.shape
    flat = normalize_percentile(images.reshape(n * c, h, w).astype(np.float32)).reshape(n, c * h * w)
    k = int(min(n_components, n - 1, flat.shape[1]))
    return PCA(k, random_state=seed).fit_transform(flat).astype(np.float32)


def extract(method: str, images: np.ndarray, channel_names: Sequence[str], weights=None, seed: int = 0,
            mask_channels: Sequence[int] | None = None, compile: bool = False) -> dict:
    """Run one method on the crops and time it.

    Returns
    -------
    dict: ``features`` (n, d) float32, ``seconds``, ``seconds_per_cell``, ``dim``, ``notes``.
    """
    import torch

    from ..model import MicrosnoopUNet, load_model

    t0 = time.perf_counter()
    notes: dict = {}
    if method == "microsnoop":
        model = load_model(weights)
        notes["model_id"] = model.model_card.model_id if model.model_card else str(weights)
        F = network_features(images, model, compile=compile)
    elif method == "random_init":
        torch.manual_seed(seed)
        F = network_features(images, MicrosnoopUNet(), compile=compile)
        notes["seed"] = seed
    elif method == "cp_measure":
        from ..features.cellprofiler import measure_object, nearest_object_masks, cellprofiler_names

        masks = nearest_object_masks(images, mask_channels)
        raw = np.stack([measure_object(im, m, channel_names) for im, m in zip(images, masks)])
        F, keep = standardize(raw)
        notes.update(raw_features=len(cellprofiler_names(channel_names)), kept_features=int(keep.sum()),
                     whole_crop_masks=int((masks.reshape(len(masks), -1).min(1) == 1).sum()))
    elif method == "pixels_pca":
        F = pixels_pca(images, seed=seed)
    else:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    sec = time.perf_counter() - t0
    return {"features": np.asarray(F, np.float32), "seconds": sec, "seconds_per_cell": sec / max(1, len(images)),
            "dim": int(F.shape[1]), "notes": notes}

