"""A segmenter that needs no weights: smoothing, Otsu threshold, distance-transform watershed."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Typical nucleus diameter in pixels that segmentation assumes unless told (Cellpose's own default);
#: the one definition every segmenter and the crop configuration use.
DIAMETER = 30.0


def segment_classical(plane: np.ndarray, diameter: float = DIAMETER, threshold: str = "otsu",
                      smooth_sigma: float | None = None, min_area: float | None = None) -> np.ndarray:
    """Segment nuclei (bright objects on a dark background).

    Parameters
    ----------
    plane : ndarray (H, W), any numeric dtype
    diameter : float
        Typical object diameter in pixels; sets smoothing, seed spacing and the
        smallest object kept.
    threshold : {"otsu", "local"}
        Global Otsu, or a local (block) threshold for uneven illumination.
    smooth_sigma : float, optional
        Gaussian sigma (default ``diameter / 15``).
    min_area : float, optional
        Objects of at most this many pixels are removed (default
        ``pi * (diameter / 6) ** 2``, a disc of a third of the diameter).

    Returns
    -------
    ndarray (H, W) int32, 0 = background, objects numbered 1..n.
    """
    from skimage.feature import peak_local_max
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    plane = np.asarray(plane, dtype=np.float32)
    if plane.ndim != 2:
        raise ValueError(f"expected one (H, W) plane, got shape {plane.shape}")
    if not np.isfinite(plane).all() or plane.max() == plane.min():
        return np.zeros(plane.shape, dtype=np.int32)
    sigma = smooth_sigma if smooth_sigma is not None else max(1.0, diameter / 15)
    fg = _foreground(ndimage.gaussian_filter(plane, sigma), threshold, diameter)
    fg = ndimage.binary_fill_holes(fg)
    min_area = min_area if min_area is not None else np.pi * (diameter / 6) ** 2
    fg = remove_small_objects(fg, max_size=int(min_area))
    if not fg.any():
        return np.zeros(plane.shape, dtype=np.int32)
    dist = ndimage.distance_transform_edt(fg)
    dist = ndimage.gaussian_filter(dist, max(1.0, diameter / 20))
    peaks = peak_local_max(dist, min_distance=max(2, int(diameter / 3)), labels=ndimage.label(fg)[0],
                           exclude_border=False)
    markers = np.zeros(plane.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=fg)
    labels = remove_small_objects(labels, max_size=int(min_area))
    # renumber 1..n
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1)
    return lut[labels]


def _foreground(smooth: np.ndarray, threshold: str, diameter: float) -> np.ndarray:
    """The bright pixels of a smoothed plane: above its Otsu threshold, or (``local``) above a block
    threshold of twice the diameter and above half of Otsu's."""
    from skimage.filters import threshold_local, threshold_otsu

    if threshold == "local":
        block = int(2 * diameter) | 1
        fg = smooth > threshold_local(smooth, block_size=block, offset=-0.05 * float(smooth.std()))
        return fg & (smooth > threshold_otsu(smooth) * 0.5)
    if threshold == "otsu":
        return smooth > threshold_otsu(smooth)
    raise ValueError(f"threshold must be 'otsu' or 'local', not {threshold!r}")
