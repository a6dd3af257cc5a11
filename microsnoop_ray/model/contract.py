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
#: The smallest side ``auto`` pads single cells to.
MIN_AUTO_SIZE = 64
#: Input sides are multiples of this (three 2x2 poolings, and the study's grid).
SIZE_STEP = 16


def input_size_for(crop_side: int, asked: str | int = "auto") -> int:
    """The side single-cell crops of one data set are padded to (issue 34's study,
    ``benchmarks/input_size_study.py``).

    ``auto``: the crop's side rounded to the nearest multiple of 16, at least 64 and at most 224
    (40-px cells -> 64, 68 -> 64 with 2 px centre-cut each side, 128 -> 128, 224 -> 224). The
    paper pads single cells to one shape per data set rather than to 224; on both dev sets
    (40 and 68 px crops) 64 gave the best kNN/MLP/silhouette means of every size tried, at
    1/16th of 224's cost. A number is used as it is (``224``: the published field-mode input).

    Parameters
    ----------
    crop_side : int
        The largest side of the data set's crops.
    asked : "auto" or int or str of an int

    Returns
    -------
    int

    Raises
    ------
    ValueError
        ``asked`` is neither ``auto`` nor a positive multiple of 16.
    """
    if str(asked).strip().lower() == "auto":
        step = int(round(crop_side / SIZE_STEP)) * SIZE_STEP
        return int(min(INPUT_SIZE, max(MIN_AUTO_SIZE, step)))
    try:
        size = int(str(asked).strip())
    except ValueError:
        size = 0
    if size <= 0 or size % SIZE_STEP:
        raise ValueError(f"input size must be 'auto' or a positive multiple of {SIZE_STEP}, not {asked!r}")
    return size


def preprocessing_contract(size: int = INPUT_SIZE) -> dict:
    """The preprocessing a model card states, at input side ``size``: the card's contract is that of
    the size the run used (``224`` is the published one; ``auto`` resolves to one size per run)."""
    return {"input_size": int(size),
            "input_size_rule": f"auto: single cells padded to their data set's crop side rounded to "
                               f"{SIZE_STEP}, at least {MIN_AUTO_SIZE}, at most {INPUT_SIZE}; fields {INPUT_SIZE}",
            "padding": f"each one-channel crop zero-padded centred to {size} x {size} (larger crops are centre-cut)",
            "normalisation": "after padding, the 1st and 99th percentiles of the padded image map to 0 and 1 "
                             "(no clipping)",
            "channels": "each channel embedded on its own",
            "readout": "global average pool of the deepest encoder map, L2-normalised (256 per channel)"}
