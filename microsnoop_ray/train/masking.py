"""Patch masking and the learning-rate schedule of Microsnoop pretraining (docs/METHOD.md section 2)."""
from __future__ import annotations

import math

import torch


def mask_patches(images: torch.Tensor, patch: int = 16, ratio: float = 0.25,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero a random ``ratio`` of the ``patch`` x ``patch`` patches of every image.

    Exactly ``round(ratio * n_patches)`` patches are zeroed per image (49 of 196 at 224 x 224
    with the defaults); the image keeps its shape.

    Parameters
    ----------
    images : Tensor, shape (n, 1, h, w)
        ``h`` and ``w`` must be multiples of ``patch``.
    patch : int
    ratio : float in [0, 1]
    generator : torch.Generator, optional
        For reproducible masks.

    Returns
    -------
    masked : Tensor, shape (n, 1, h, w), same dtype and device as ``images``
    mask : Tensor of bool, shape (n, 1, h, w)
        True where a pixel was zeroed.
    """
    n, _, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    gh, gw = h // patch, w // patch
    n_masked = int(round(ratio * gh * gw))
    noise = torch.rand(n, gh * gw, generator=generator, device=generator.device if generator else "cpu")
    order = noise.argsort(dim=1)
    grid = torch.zeros(n, gh * gw, dtype=torch.bool, device=order.device)
    grid.scatter_(1, order[:, :n_masked], True)
    grid = grid.view(n, 1, gh, gw).to(images.device)
    mask = grid.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
    return images.masked_fill(mask, 0.0), mask


def learning_rate(epoch: int, base_lr: float = 1e-3, warmup: int = 40, nepoch: int = 1000) -> float:
    """The pretraining schedule: linear warm-up, then cosine decay to zero at ``nepoch``.

    ``lr = base_lr * epoch / warmup`` for ``epoch < warmup``, then
    ``lr = base_lr * 0.5 * (1 + cos(pi * (epoch - warmup) / (nepoch - warmup)))``.
    (Epoch 0 thus trains at learning rate 0, as in the reference.)
    """
    if epoch < warmup:
        return base_lr * epoch / warmup
    if nepoch <= warmup:
        return base_lr
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (nepoch - warmup)))
