"""Cellpose 3 segmentation from local weight files, fields batched through the network.

Cellpose downloads its named models from the internet, which many cluster nodes
(and this project's machines) cannot do. :func:`resolve_cellpose_weights`
accepts a local weights file, or a model name already present in Cellpose's
local model folder, and never downloads. Weights of the Cellpose architecture
saved under other key names (the "cyto" weights in the ``scellseg`` package:
``extractor.``/``tasker.`` prefixes, no ``diam_mean``) are converted once by
:func:`convert_cellpose_weights` into a file Cellpose loads.

Cellpose evaluates a *list* of images one at a time; :class:`CellposeSegmenter`
instead stacks fields of equal size into one array, which Cellpose runs through
its network in shared tile batches (its "run multiple slices at the same time"
path), so the network is not idle between fields.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.cache import cache_dir
from .classical import DIAMETER

log = logging.getLogger("microsnoop_ray.segment")

_RENAMES = (("extractor.", ""), ("tasker.upsample", "upsample"), ("tasker.base_bn", "output.0"),
            ("tasker.base_conv", "output.2"))


def convert_cellpose_weights(path: str | os.PathLike, diameter: float = DIAMETER) -> Path:
    """Return a Cellpose-loadable copy of ``path`` (the file itself if it already loads).

    Parameters
    ----------
    path : weights file of the Cellpose network, possibly with scellseg key names
    diameter : float
        ``diam_mean``/``diam_labels`` to add when the file has none (30 for the
        Cellpose "cyto" model).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "Cellpose weights file does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(path, f"not a readable Cellpose weights file ({str(exc).splitlines()[0][:160]})") from None
    if not isinstance(sd, dict) or not sd:
        raise InputError(path, "not a Cellpose state dict")
    needs = any(k.startswith(("extractor.", "tasker.")) for k in sd) or "diam_mean" not in sd
    if not needs:
        return path
    out = {}
    for k, v in sd.items():
        for old, new in _RENAMES:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    out.setdefault("diam_mean", torch.tensor([float(diameter)]))
    out.setdefault("diam_labels", torch.tensor([float(diameter)]))
    if "downsample.down.res_down_0.conv.conv_0.2.weight" not in out:
        raise InputError(path, "state dict is not of the Cellpose architecture")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    target = cache_dir() / "cellpose-weights" / f"{path.stem}-{digest}.pt"
    if not target.exists():
        from ..io.atomic import atomic_path

        with atomic_path(target) as tmp:
            torch.save(out, tmp)
    return target


def resolve_cellpose_weights(model: str | os.PathLike | None, required: bool = True) -> Path | None:
    """A local weights path for ``model`` (a file, or a name in Cellpose's local model folder).

    Never downloads. Returns None when ``model`` is None/not found and not ``required``.
    """
    if model is None:
        if required:
            raise InputError("--cellpose-model", "Cellpose needs a local weights file: named models are "
                             "downloaded from the internet by Cellpose, which is not possible here")
        return None
    p = Path(model)
    if p.is_file():
        return convert_cellpose_weights(p)
    local = Path(os.environ.get("CELLPOSE_LOCAL_MODELS_PATH", Path.home() / ".cellpose" / "models")) / str(model)
    if local.is_file():
        return convert_cellpose_weights(local)
    if required:
        raise InputError(model, f"no such weights file, and no model of that name in {local.parent} "
                                "(microsnoop-ray does not download Cellpose models)")
    return None


class CellposeSegmenter:
    """Cellpose 3 on one channel (or cytoplasm + nuclei), batched across fields.

    Parameters
    ----------
    weights : path
        A Cellpose-loadable weights file (see :func:`resolve_cellpose_weights`).
    diameter : float
        Expected object diameter in pixels.
    batch_size : int
        Tiles per network pass (224 x 224 each).
    gpu : bool
        Use CUDA when available.
    """

    def __init__(self, weights: str | os.PathLike, diameter: float = DIAMETER, batch_size: int = 8, gpu: bool = False,
                 flow_threshold: float = 0.4, cellprob_threshold: float = 0.0):
        import torch
        from cellpose import models

        self.weights = Path(weights)
        self.diameter = float(diameter)
        self.batch_size = batch_size
        self.flow_threshold, self.cellprob_threshold = flow_threshold, cellprob_threshold
        use_gpu = bool(gpu and torch.cuda.is_available())
        self.model = models.CellposeModel(pretrained_model=str(self.weights), gpu=use_gpu)

    def __call__(self, planes: list[np.ndarray], cyto: list[np.ndarray] | None = None,
                 diameter: float | None = None) -> list[np.ndarray]:
        """Segment fields.

        Parameters
        ----------
        planes : list of (H, W) arrays
            The nuclei (or single segmentation) channel of each field.
        cyto : list of (H, W) arrays, optional
            A cytoplasm channel; with it Cellpose sees (cyto, nuclei).
        diameter : float, optional
            The objects' diameter for this call (default: the segmenter's).

        Returns
        -------
        list of (H, W) int32 label images, in input order.
        """
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(planes):
            groups[np.shape(p)].append(i)
        out: list[np.ndarray | None] = [None] * len(planes)
        for shape, idx in groups.items():
            if cyto is None:
                x = np.stack([np.asarray(planes[i], dtype=np.float32) for i in idx])[..., None]
                channels = [0, 0]
            else:
                x = np.stack([np.stack([np.asarray(cyto[i], np.float32), np.asarray(planes[i], np.float32)], -1)
                              for i in idx])
                channels = [1, 2]
            masks, _, _ = self.model.eval(x, channels=channels, channel_axis=-1,
                                          diameter=float(diameter or self.diameter),
                                          batch_size=self.batch_size, flow_threshold=self.flow_threshold,
                                          cellprob_threshold=self.cellprob_threshold)
            masks = np.asarray(masks)
            if len(idx) == 1 and masks.ndim == 2:
                masks = masks[None]
            for j, i in enumerate(idx):
                out[i] = masks[j].astype(np.int32)
        return out
