"""The Microsnoop network: a Cellpose-style residual U-Net on one-channel images.

The module names reproduce the published checkpoint's state-dict layout exactly
(311 entries, see ``docs/METHOD.md`` section 1); that layout is a public contract:
a checkpoint written by the reference code loads here unchanged, and ours
loads there.

Blocks
------
``brc``   BatchNorm -> ReLU -> Conv (pre-activation unit), keys ``.0`` / ``.2``
``bc``    BatchNorm -> Conv 1x1 (projection shortcut), keys ``.0`` / ``.1``
``ResidualDown``  ``h = bc(x) + brc1(brc0(x)); out = h + brc3(brc2(h))``
``StyleConv``     ``conv(relu(bn(h + Linear(style))))``
``ResidualUp``    ``o = bc(x) + sc1(brc0(x) + skip, s); o + sc3(sc2(o, s), s)``
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .contract import EMBED_DIM, WIDTHS


def brc(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    """BatchNorm -> ReLU -> Conv (keys ``0``, ``2``)."""
    return nn.Sequential(
        nn.BatchNorm2d(cin, eps=1e-5),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2),
    )


def bc(cin: int, cout: int) -> nn.Sequential:
    """BatchNorm -> Conv 1x1 projection shortcut, no activation (keys ``0``, ``1``)."""
    return nn.Sequential(nn.BatchNorm2d(cin, eps=1e-5), nn.Conv2d(cin, cout, 1))


class ResidualDown(nn.Module):
    """Two pre-activation residual units; the first one changes the width."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential()
        for t in range(4):
            self.conv.add_module(f"conv_{t}", brc(cin if t == 0 else cout, cout))
        self.proj = bc(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) + self.conv[1](self.conv[0](x))
        return h + self.conv[3](self.conv[2](h))


class Downsample(nn.Module):
    """The encoder trunk: four residual down blocks joined by 2x2 max pooling."""

    def __init__(self, widths=(1,) + WIDTHS):
        super().__init__()
        self.down = nn.Sequential()
        for k in range(len(widths) - 1):
            self.down.add_module(f"res_down_{k}", ResidualDown(widths[k], widths[k + 1]))
        self.maxpool = nn.MaxPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        for k, block in enumerate(self.down):
            levels.append(block(x if k == 0 else self.maxpool(levels[-1])))
        return levels


class Encoder(nn.Module):
    """Encoder: returns the feature map of every level, deepest last."""

    def __init__(self, in_chans: int = 1):
        super().__init__()
        self.downsample = Downsample((in_chans,) + WIDTHS)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.downsample(x)


def style_vector(deepest: torch.Tensor) -> torch.Tensor:
    """Global average pool of the deepest map, divided by its L2 norm.

    Parameters
    ----------
    deepest : torch.Tensor, shape (N, 256, h, w)

    Returns
    -------
    torch.Tensor, shape (N, 256)
        Unit-length style vectors; this is the Microsnoop embedding.
    """
    pooled = deepest.mean(dim=(-2, -1))
    return pooled / torch.sum(pooled**2, dim=1, keepdim=True) ** 0.5


class StyleConv(nn.Module):
    """Add a linear projection of the style, then BatchNorm -> ReLU -> Conv."""

    def __init__(self, cin: int, cout: int, style_dim: int = EMBED_DIM):
        super().__init__()
        self.conv = brc(cin, cout)
        self.full = nn.Linear(style_dim, cin)

    def forward(self, style: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x + self.full(style)[:, :, None, None])


class ResidualUp(nn.Module):
    """Residual up block fed by a skip connection and the style vector."""

    def __init__(self, cin: int, cout: int, style_dim: int = EMBED_DIM):
        super().__init__()
        self.conv = nn.Sequential()
        self.conv.add_module("conv_0", brc(cin, cout))
        for t in (1, 2, 3):
            self.conv.add_module(f"conv_{t}", StyleConv(cout, cout, style_dim))
        self.proj = bc(cin, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        o = self.proj(x) + self.conv[1](style, self.conv[0](x) + skip)
        return o + self.conv[3](style, self.conv[2](style, o))


class Upsample(nn.Module):
    """Decoder trunk: the deepest block takes x3 as its own skip, then x2 nearest steps."""

    def __init__(self, widths=WIDTHS + (WIDTHS[-1],)):
        super().__init__()
        self.up = nn.Sequential()
        for k in range(1, len(widths)):
            self.up.add_module(f"res_up_{k - 1}", ResidualUp(widths[k], widths[k - 1], widths[-1]))

    def forward(self, style: torch.Tensor, levels: list[torch.Tensor]) -> torch.Tensor:
        x = self.up[-1](levels[-1], levels[-1], style)
        for k in range(len(self.up) - 2, -1, -1):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = self.up[k](x, levels[k], style)
        return x


class Decoder(nn.Module):
    """Decoder with a linear one-channel reconstruction head."""

    def __init__(self, out_chans: int = 1):
        super().__init__()
        self.upsample = Upsample()
        self.base_bn = nn.BatchNorm2d(WIDTHS[0], eps=1e-5)
        self.base_conv = nn.Conv2d(WIDTHS[0], out_chans, 1)

    def forward(self, levels: list[torch.Tensor], style: torch.Tensor) -> torch.Tensor:
        x = self.upsample(style, levels)
        return self.base_conv(F.relu(self.base_bn(x)))


class MicrosnoopUNet(nn.Module):
    """The full network: encoder, style vector, decoder.

    ``forward`` reconstructs its input (masked-image pretraining);
    :meth:`embed` gives the 256-value embedding of each one-channel image.

    Inputs are float32 tensors of shape (N, 1, H, W) with H and W multiples of 8.
    """

    def __init__(self, in_chans: int = 1):
        super().__init__()
        self.encoder = Encoder(in_chans)
        self.decoder = Decoder(in_chans)

    def forward(self, x: torch.Tensor, skips: str = "keep", noise: float = 1.0) -> torch.Tensor:
        """Reconstruct ``x``. ``skips`` only changes pretraining, never the embedding:

        ``"keep"`` (the paper) feeds every encoder level to the decoder; ``"drop"`` zeroes the
        three shallow skip connections, and ``"noise"`` adds Gaussian noise of ``noise`` times
        each map's standard deviation to them, so that the deepest map (whose pooled,
        normalised mean is the embedding) must carry the image's content.
        """
        levels = self.encoder(x)
        if skips == "drop":
            levels = [torch.zeros_like(t) for t in levels[:-1]] + [levels[-1]]
        elif skips == "noise":
            levels = [t + noise * t.detach().std() * torch.randn_like(t) for t in levels[:-1]] + [levels[-1]]
        elif skips != "keep":
            raise ValueError(f"skips must be 'keep', 'drop' or 'noise', not {skips!r}")
        return self.decoder(levels, style_vector(levels[-1]))

    def embed(self, x: torch.Tensor, lower: torch.dtype | None = None, fp32_blocks: tuple[int, ...] = ()
              ) -> torch.Tensor:
        """(N, 1, H, W) float32 -> (N, 256) unit-norm embeddings (encoder only).

        ``lower`` (``torch.bfloat16`` or ``torch.float16``) runs each residual down block, except
        those in ``fp32_blocks``, under autocast to that type. Each block's output is cast back to
        float32, so the max pooling between blocks, the global average and the L2 normalisation stay
        float32: the embedding is a mean over thousands of positions and a division by its norm, and
        those two are where reduced precision would move it most.
        """
        if lower is None:
            return style_vector(self.encoder(x)[-1])
        h = x
        for k, block in enumerate(self.encoder.downsample.down):
            if k:
                h = self.encoder.downsample.maxpool(h)
            with torch.autocast(x.device.type, dtype=lower, enabled=k not in fp32_blocks):
                h = block(h).float()
        return style_vector(h)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
