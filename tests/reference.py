"""An independent re-implementation of the Microsnoop network and preprocessing.

Written from METHOD.md alone, with functional torch ops on a bare state dict and
per-image NumPy loops, sharing no code with ``microsnoop_ray``. Tests compare
the package against it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

WIDTHS = (1, 32, 64, 128, 256)


def published_state_dict(seed: int = 0, prefix: str = "module.") -> dict:
    """A complete state dict in the published layout, built from the key formula.

    Random weights and non-trivial BatchNorm statistics (means != 0, variances
    != 1), so that eval-mode normalisation matters.
    """
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def bn(name, c):
        sd[f"{name}.weight"] = 1 + 0.2 * torch.randn(c, generator=g)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.running_mean"] = 0.3 * torch.randn(c, generator=g)
        sd[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=g)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(1000)

    def conv(name, cin, cout, k):
        std = (2.0 / (cin * k * k)) ** 0.5
        sd[f"{name}.weight"] = std * torch.randn(cout, cin, k, k, generator=g)
        sd[f"{name}.bias"] = 0.05 * torch.randn(cout, generator=g)

    for k in range(4):
        p = f"encoder.downsample.down.res_down_{k}"
        cin, cout = WIDTHS[k], WIDTHS[k + 1]
        for t in range(4):
            bn(f"{p}.conv.conv_{t}.0", cin if t == 0 else cout)
            conv(f"{p}.conv.conv_{t}.2", cin if t == 0 else cout, cout, 3)
        bn(f"{p}.proj.0", cin)
        conv(f"{p}.proj.1", cin, cout, 1)
    up = [(64, 32), (128, 64), (256, 128), (256, 256)]
    for k, (cin, cout) in enumerate(up):
        p = f"decoder.upsample.up.res_up_{k}"
        bn(f"{p}.conv.conv_0.0", cin)
        conv(f"{p}.conv.conv_0.2", cin, cout, 3)
        for t in (1, 2, 3):
            bn(f"{p}.conv.conv_{t}.conv.0", cout)
            conv(f"{p}.conv.conv_{t}.conv.2", cout, cout, 3)
            sd[f"{p}.conv.conv_{t}.full.weight"] = 0.05 * torch.randn(cout, 256, generator=g)
            sd[f"{p}.conv.conv_{t}.full.bias"] = 0.05 * torch.randn(cout, generator=g)
        bn(f"{p}.proj.0", cin)
        conv(f"{p}.proj.1", cin, cout, 1)
    bn("decoder.base_bn", 32)
    conv("decoder.base_conv", 32, 1, 1)
    return {prefix + k: v for k, v in sd.items()}


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + ".running_mean"].double(), sd[p + ".running_var"].double(),
                        sd[p + ".weight"].double(), sd[p + ".bias"].double(), False, 0.0, 1e-5)


def _conv(x, sd, p):
    w = sd[p + ".weight"].double()
    return F.conv2d(x, w, sd[p + ".bias"].double(), padding=w.shape[-1] // 2)


def _brc(x, sd, p):
    return _conv(F.relu(_bn(x, sd, p + ".0")), sd, p + ".2")


def encoder_levels(x: torch.Tensor, sd: dict) -> list:
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    levels = []
    for k in range(4):
        p = f"encoder.downsample.down.res_down_{k}"
        inp = x if k == 0 else F.max_pool2d(levels[-1], 2)
        h = _conv(_bn(inp, sd, p + ".proj.0"), sd, p + ".proj.1") + _brc(_brc(inp, sd, p + ".conv.conv_0"), sd, p + ".conv.conv_1")
        levels.append(h + _brc(_brc(h, sd, p + ".conv.conv_2"), sd, p + ".conv.conv_3"))
    return levels


def style(x3):
    g = x3.mean(dim=(2, 3))
    return g / torch.sqrt((g ** 2).sum(dim=1, keepdim=True))


def reconstruct(x: torch.Tensor, sd: dict) -> torch.Tensor:
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    lv = encoder_levels(x, sd)
    s = style(lv[-1])

    def sc(h, p):
        f = F.linear(s, sd[p + ".full.weight"].double(), sd[p + ".full.bias"].double())
        return _brc(h + f[:, :, None, None], sd, p + ".conv")

    def up(h, skip, p):
        a = _brc(h, sd, p + ".conv.conv_0")
        o = _conv(_bn(h, sd, p + ".proj.0"), sd, p + ".proj.1") + sc(a + skip, p + ".conv.conv_1")
        return o + sc(sc(o, p + ".conv.conv_2"), p + ".conv.conv_3")

    h = up(lv[3], lv[3], "decoder.upsample.up.res_up_3")
    for k in (2, 1, 0):
        h = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        h = up(h, lv[k], f"decoder.upsample.up.res_up_{k}")
    return _conv(F.relu(_bn(h, sd, "decoder.base_bn")), sd, "decoder.base_conv")


def normalize99(plane: np.ndarray) -> np.ndarray:
    """The reference normalisation of one padded plane (ordinary, non-degenerate case)."""
    plane = plane.astype(np.float64)
    lo, hi = np.percentile(plane, 1), np.percentile(plane, 99)
    if plane.max() == plane.min():
        return plane
    return (plane - lo) / (hi - lo)


def embed_reference(images: np.ndarray, sd: dict, size: int = 224) -> np.ndarray:
    """(N, C, H, W) -> (N, 256*C), one image and one channel at a time, in float64."""
    rows = []
    for img in images:
        parts = []
        for plane in img:
            h, w = plane.shape
            top, left = (size - h) // 2, (size - w) // 2
            padded = np.pad(plane.astype(np.float64), ((top, size - h - top), (left, size - w - left)))
            x = torch.from_numpy(normalize99(padded))[None, None]
            parts.append(style(encoder_levels(x, sd)[-1])[0].numpy())
        rows.append(np.concatenate(parts))
    return np.stack(rows)
