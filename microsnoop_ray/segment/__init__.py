"""Segmentation: one chosen channel of a field -> a label image (0 = background).

Backends
--------
``cellpose``   the real Cellpose 3 network from a local weights file
               (:class:`CellposeSegmenter`); fields of equal size are batched
               through the network together.
``classical``  smoothing, Otsu threshold, distance-transform watershed; needs
               no weights and is the automatic fallback (:func:`segment_classical`).
Supplied label images and supplied object centres skip segmentation
(:func:`microsnoop_ray.crop.windows.bboxes_from_centres`).
"""
from .classical import DIAMETER, segment_classical
from .cellpose_backend import CellposeSegmenter, convert_cellpose_weights, resolve_cellpose_weights

#: Segmentation methods: ``auto`` is Cellpose when weights are available, else the classical one.
SEGMENTERS = ("auto", "cellpose", "classical")

__all__ = ["SEGMENTERS", "DIAMETER", "segment_classical", "CellposeSegmenter", "convert_cellpose_weights", "resolve_cellpose_weights",
           "make_segmenter", "describe_segmenter"]


def describe_segmenter(method: str = "auto", cellpose_model=None, diameter: float = DIAMETER) -> str:
    """What :func:`make_segmenter` will use for these options, without loading any network
    (``auto`` resolved to Cellpose or the classical fallback)."""
    weights = None
    if method in ("auto", "cellpose"):
        weights = resolve_cellpose_weights(cellpose_model, required=(method == "cellpose"))
    return _description(weights, diameter)


def _description(weights, diameter: float) -> str:
    return f"cellpose:{weights.name}:diameter={diameter}" if weights is not None \
        else f"classical:otsu-watershed:diameter={diameter}"


def make_segmenter(method: str = "auto", cellpose_model=None, diameter: float = DIAMETER, batch_size: int = 8,
                   gpu: bool = False):
    """Build a callable ``list of (H, W) planes -> list of label images``.

    ``method="auto"`` uses Cellpose when weights are available and the classical
    segmenter otherwise (logged as a warning). ``gpu`` runs Cellpose on CUDA when there is a
    device. Returns ``(callable, description)``; the description is recorded in the output metadata.
    """
    import logging

    log = logging.getLogger("microsnoop_ray.segment")
    if method not in SEGMENTERS:
        raise ValueError(f"segmenter must be one of {SEGMENTERS}, not {method!r}")
    if method in ("auto", "cellpose"):
        weights = resolve_cellpose_weights(cellpose_model, required=(method == "cellpose"))
        if weights is not None:
            seg = CellposeSegmenter(weights, diameter=diameter, batch_size=batch_size, gpu=gpu)
            return seg, _description(weights, diameter)
        log.warning("no Cellpose weights available (pass --cellpose-model FILE); "
                    "falling back to the classical segmenter (Otsu + watershed)")
    return (lambda planes: [segment_classical(p, diameter=diameter) for p in planes]), _description(None, diameter)
