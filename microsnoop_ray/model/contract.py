"""The numbers of the network's contract that need no torch: the side of its input, the length of
its embedding, the widths of its levels.

Apart from :mod:`~microsnoop_ray.model.unet` so that the stages that only read and crop (Ray tasks
and actors on every node) import them without loading torch.
"""
from __future__ import annotations

#: Feature widths of the four encoder levels.
WIDTHS: tuple[int, ...] = (32, 64, 128, 256)
#: Length of the style vector and of the per-channel embedding.
EMBED_DIM = 256
#: Side of the network's input in the published recipe.
INPUT_SIZE = 224
