"""Checkpoint conversion as pure filter functions: other layouts -> the Microsnoop state dict.

Cellpose's network (``CPnet``) has exactly Microsnoop's encoder and decoder trunk
(Microsnoop was built on it); only the names, the number of input channels and the
output head differ:

* Cellpose 3 (``cellpose==3.*``): ``downsample.down.res_down_{k}...``,
  ``upsample.up.res_up_{k}...``, head ``output.0`` (BatchNorm) / ``output.2``
  (1x1 conv to 3 outputs: two flows and the cell probability), plus ``diam_mean``
  and ``diam_labels``.
* scellseg's copy of the Cellpose "cyto" network: the same tensors prefixed
  ``extractor.`` (trunk) and ``tasker.`` (head: ``tasker.base_bn``, ``tasker.base_conv``).

Conversion keeps the encoder and the decoder trunk, reduces the first layer from
Cellpose's two input channels to one (keeping the weights of one input channel,
the first by default: the cytoplasm or grey channel in Cellpose's convention), and
drops the 3-output head, which has no counterpart in a one-channel reconstruction
network: a converted state dict therefore lacks ``decoder.base_bn.*`` and
``decoder.base_conv.*`` and loads with the head at its initial values.

scellseg's own networks (``scellseg``, ``hover`` in its sdist) keep the Cellpose encoder
unchanged under ``extractor.downsample`` but have decoders of another shape (hierarchical
style concatenation). Embeddings need only the encoder: :func:`split_fitting` keeps the
tensors that fit the Microsnoop layout and returns the others, so that the loader can say
what it left out.
"""
from __future__ import annotations

from typing import Mapping

import torch

#: first-layer tensors whose channel axis is Cellpose's input channels: name -> axis
FIRST_LAYER = {
    "encoder.downsample.down.res_down_0.conv.conv_0.0.weight": 0,
    "encoder.downsample.down.res_down_0.conv.conv_0.0.bias": 0,
    "encoder.downsample.down.res_down_0.conv.conv_0.0.running_mean": 0,
    "encoder.downsample.down.res_down_0.conv.conv_0.0.running_var": 0,
    "encoder.downsample.down.res_down_0.conv.conv_0.2.weight": 1,
    "encoder.downsample.down.res_down_0.proj.0.weight": 0,
    "encoder.downsample.down.res_down_0.proj.0.bias": 0,
    "encoder.downsample.down.res_down_0.proj.0.running_mean": 0,
    "encoder.downsample.down.res_down_0.proj.0.running_var": 0,
    "encoder.downsample.down.res_down_0.proj.1.weight": 1,
}


def strip_wrappers(sd: Mapping[str, torch.Tensor]) -> dict:
    """Drop a ``module.`` (DataParallel) prefix and scellseg's ``extractor.``/``tasker.`` prefixes."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if k.startswith("extractor."):
            k = k.removeprefix("extractor.")
        elif k.startswith("tasker."):
            k = "cellpose_head." + k.removeprefix("tasker.")
        out[k] = v
    return out


def is_cellpose_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """True for a Cellpose 3 or scellseg state dict (its trunk keys lack Microsnoop's ``encoder.``/``decoder.``)."""
    keys = strip_wrappers(sd).keys()
    return any(k.startswith("downsample.down.res_down_0.") for k in keys)


def rename_cellpose(sd: Mapping[str, torch.Tensor]) -> dict:
    """Cellpose names -> Microsnoop names; the Cellpose head and scalars are dropped."""
    out = {}
    for k, v in strip_wrappers(sd).items():
        if k.startswith("downsample."):
            out["encoder." + k] = v
        elif k.startswith("upsample."):
            out["decoder." + k] = v
    return out


def first_layer_to_one_channel(sd: Mapping[str, torch.Tensor], channel: int = 0) -> dict:
    """Keep input channel ``channel`` of the first layer's BatchNorm and convolutions."""
    out = dict(sd)
    for k, axis in FIRST_LAYER.items():
        if k not in out:
            raise KeyError(f"not a Cellpose-layout state dict: {k} is missing")
        t = out[k]
        if t.shape[axis] <= channel:
            raise ValueError(f"{k} has {t.shape[axis]} input channel(s); channel {channel} does not exist")
        out[k] = t.narrow(axis, channel, 1).clone()
    return out


def cellpose_to_microsnoop(sd: Mapping[str, torch.Tensor], channel: int = 0) -> dict:
    """A Cellpose 3 or scellseg state dict -> a Microsnoop state dict (encoder and decoder trunk, no head).

    Parameters
    ----------
    sd : mapping of str to Tensor
        As ``torch.load`` returns it for a Cellpose weights file.
    channel : int
        Which of Cellpose's input channels the one-channel first layer keeps.
    """
    if not is_cellpose_state_dict(sd):
        raise KeyError("not a Cellpose state dict (no downsample.down.res_down_0.* tensors)")
    return first_layer_to_one_channel(rename_cellpose(sd), channel)


def split_fitting(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Keep the encoder and, only when every one of its tensors fits, the decoder trunk.

    Parameters
    ----------
    sd : mapping of str to Tensor
        A converted state dict (:func:`cellpose_to_microsnoop`).
    expected : mapping of str to Tensor
        The Microsnoop network's own state dict (names and shapes are what is compared).

    Returns
    -------
    (kept, left_out) : the state dict to load and the sorted names of the decoder tensors left
    out (a decoder is kept whole or not at all: half a decoder reconstructs nothing).
    """
    def fits(k):
        return k in expected and tuple(sd[k].shape) == tuple(expected[k].shape)

    encoder = {k: v for k, v in sd.items() if k.startswith("encoder.")}
    decoder = {k: v for k, v in sd.items() if not k.startswith("encoder.")}
    if all(fits(k) for k in decoder):
        return {**encoder, **decoder}, []
    return encoder, sorted(decoder)
