"""Masked-image reconstruction: the paper's Fig. 2 picture and the masked-region error."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..model.preprocess import normalize_percentile, pad_center
from ..plots import save_figure
from .masking import mask_patches


def center_target(plane: np.ndarray, size: int = 224, at: tuple[int, int] | None = None) -> np.ndarray:
    """A ``size`` crop (zero-padded if smaller), percentile-normalised: (size, size) float32.

    The central crop by default; ``at=(top, left)`` takes the window there instead.
    """
    h, w = plane.shape
    top, left = at if at is not None else (max(0, (h - size) // 2), max(0, (w - size) // 2))
    return normalize_percentile(pad_center(plane[top:top + size, left:left + size], size)[None])[0]


def busiest_window(plane: np.ndarray, size: int = 224) -> tuple[int, int]:
    """(top, left) of the ``size`` window, on a grid of quarter steps, whose pixels vary most.

    A field's centre is often empty; this finds the window with the most structure
    (cells) for the reconstruction figure.
    """
    h, w = plane.shape
    step = max(1, size // 4)
    best, where = -1.0, (0, 0)
    for top in range(0, max(1, h - size + 1), step):
        for left in range(0, max(1, w - size + 1), step):
            v = float(np.asarray(plane[top:top + size, left:left + size], np.float32).std())
            if v > best:
                best, where = v, (top, left)
    return where


@torch.inference_mode()
def reconstruct(model, targets: np.ndarray, patch: int = 16, ratio: float = 0.25, seed: int = 0) -> dict:
    """Mask targets (n, s, s), reconstruct them, and measure the error on the masked pixels.

    Returns
    -------
    dict with ``masked`` and ``reconstruction`` (n, s, s) float32, ``mask`` (n, s, s) bool,
    ``mse_masked`` (the model), ``mse_masked_zero`` (predicting zeros there) and
    ``mse_masked_mean`` (predicting each image's visible mean) per image.
    """
    x = torch.from_numpy(np.ascontiguousarray(targets, np.float32))[:, None]
    gen = torch.Generator().manual_seed(seed)
    masked, mask = mask_patches(x, patch, ratio, gen)
    model = model.eval()
    pred = model(masked.to(next(model.parameters()).device)).float().cpu()
    m = mask.float()
    per = lambda p: (((p - x) ** 2) * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3))  # noqa: E731
    visible_mean = (x * (1 - m)).sum(dim=(1, 2, 3), keepdim=True) / (1 - m).sum(dim=(1, 2, 3), keepdim=True)
    return {"masked": masked[:, 0].numpy(), "reconstruction": pred[:, 0].numpy(), "mask": mask[:, 0].numpy(),
            "mse_masked": per(pred).numpy(), "mse_masked_zero": per(torch.zeros_like(x)).numpy(),
            "mse_masked_mean": per(visible_mean.expand_as(x)).numpy()}


def reconstruction_figure(targets: np.ndarray, result: dict, path: str | Path, titles: Sequence[str] = ()) -> Path:
    """Rows of (original, masked input, reconstruction), like Fig. 2 of the paper."""
    from ..plots import new_figure

    n = len(targets)
    fig = new_figure(figsize=(7.5, 2.6 * n))
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        lo, hi = np.percentile(targets[i], [0.5, 99.5])
        for j, (img, name) in enumerate(((targets[i], "original"), (result["masked"][i], "masked input (25%)"),
                                         (result["reconstruction"][i], f"reconstruction, masked MSE "
                                                                       f"{result['mse_masked'][i]:.4f}"))):
            axes[i, j].imshow(img, cmap="gray", vmin=lo, vmax=hi)
            axes[i, j].set_axis_off()
            axes[i, j].set_title(name if not (j == 0 and i < len(titles)) else f"{titles[i]}", fontsize=8)
    return save_figure(fig, path, dpi=100)


def reconstruct_files(images, out, weights=None, window: str = "center", channel: int = 0, size: int = 224,
                      mask_ratio: float = 0.25, seed: int = 0) -> dict:
    """Mask and reconstruct one ``size`` window (``center`` or ``busiest``) of one channel of each
    field file; write the figure to ``out`` and return the masked-region MSEs (and two baselines).
    ``weights`` default to the package's MAE network (the default embedding weights have no decoder)."""
    from ..errors import InputError
    from ..io.images import read_field
    from ..model.load import load_model, mae_weights_path

    weights = weights if weights is not None else mae_weights_path()
    model = load_model(weights)
    if not getattr(model, "has_decoder", True):
        raise InputError(weights, "encoder-only weights cannot reconstruct images")
    targets, titles = [], []
    for path in map(Path, images):
        image = read_field(path)
        c = min(channel, image.shape[0] - 1)
        at = busiest_window(image[c], size) if window == "busiest" else None
        targets.append(center_target(image[c], size, at))
        titles.append(f"{path.name} [ch {c}]" + (f"\nwindow at row {at[0]}, column {at[1]}" if at else ""))
    targets = np.stack(targets)
    result = reconstruct(model, targets, ratio=mask_ratio, seed=seed)
    reconstruction_figure(targets, result, out, titles)
    return {"weights": getattr(model, "weights_path", None),
            "model_id": model.model_card.model_id if model.model_card else None,
            "images": [str(p) for p in images],
            "mse_masked": float(result["mse_masked"].mean()),
            "mse_masked_zero_prediction": float(result["mse_masked_zero"].mean()),
            "mse_masked_visible_mean": float(result["mse_masked_mean"].mean()),
            "per_image": [float(v) for v in result["mse_masked"]], "figure": str(out)}
