"""CellProfiler measurements of each cell, on its own object, with cp-measure.

cp-measure re-implements CellProfiler's measurement modules (MeasureObjectSizeShape,
MeasureObjectIntensity, MeasureTexture, MeasureGranularity, MeasureObjectIntensityDistribution,
MeasureColocalization) as functions on arrays. This module runs them on one object at a time and
names the results the way CellProfiler does, so that pycytominer's ``features="infer"`` finds them:

=====================================  ==============================================
cp-measure                              CellProfiler column (compartment ``Cells``)
=====================================  ==============================================
``Area``                                ``Cells_AreaShape_Area``
``Intensity_MeanIntensity__DNA``        ``Cells_Intensity_MeanIntensity_DNA``
``Contrast_3_00_256__DNA``              ``Cells_Texture_Contrast_DNA_3_00_256``
``Granularity_1__DNA``                  ``Cells_Granularity_1_DNA``
``RadialDistribution_FracAtD_1of4__DNA`` ``Cells_RadialDistribution_FracAtD_DNA_1of4``
``Correlation_Pearson__DNA__ER``        ``Cells_Correlation_Correlation_DNA_ER``
``Correlation_Manders_2__DNA__ER``      ``Cells_Correlation_Manders_ER_DNA``
=====================================  ==============================================

Why some are left out: positions (``Center_X``, bounding-box corners, ``Location_*``) depend on
where the object lies, not on what it looks like; its centre is already the row's
``Metadata_Location_Center_X/Y``. cp-measure measures Pearson, slope and Costes for both orders
of a channel pair; CellProfiler measures each pair once, in the order the channels are listed,
so a name that the other order gives again is kept from the first (Costes' thresholds depend on
the order, so the two are not equal).

Pixel scale (:func:`intensity_scale`), one rule for ``embed``, ``fields`` and ``profile``: integer
images are divided by their type's maximum (65535 for uint16), as CellProfiler reads them; float
images within [-1, 1] are measured as they are (CellProfiler's and scikit-image's float
convention); other float images hold raw intensities, and are divided by the maximum of the
smallest integer depth that holds them (255, 4095, 65535, else the next 2**k - 1), taken over the
whole set of cells in ``embed`` and over the field (or a site's chunk of cells) in ``fields`` and
``profile``. A float copy of an 8-bit image is so measured as the 8-bit image would be, every cell
of one set is divided by the same number, and ``embed``'s provenance records the divisor.

Non-finite values, one rule: whatever cp-measure cannot define for an object (a correlation with a
constant channel, a radial bin with no pixels) is written as NaN, and infinities become NaN too;
nothing is set to zero. Aggregation skips NaN (a well's value is the mean of the cells that have
one); a feature still NaN in a well profile is left out of the profiles, named in ``summary.json``.

A cell cp-measure cannot measure at all (its object is empty in the window, or a measurement
module raises on it) is reported with the reason, never filled in.
"""
from __future__ import annotations

import functools
import warnings
from typing import Sequence

import numpy as np

#: the feature sets a command can write (``--features``)
FEATURE_SETS = ("microsnoop", "cellprofiler")
#: the compartment of one object per crop (cell arrays, ``embed``, supplied label images): the cell
COMPARTMENT = "Cells"
#: CellProfiler's Cell Painting compartments, in its column order: the nucleus, the whole cell grown
#: around it, and the cytoplasm (cell minus nucleus)
COMPARTMENTS = ("Nuclei", "Cells", "Cytoplasm")
#: measures that depend on the object's position, not its appearance (see the module docstring)
_POSITION = ("Center_", "BoundingBoxMinimum_", "BoundingBoxMaximum_", "Location_")


class MeasureError(Exception):
    """cp-measure could not measure one object (the cell is dropped with this reason)."""


def parse_feature_sets(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"microsnoop,cellprofiler"`` -> ``("microsnoop", "cellprofiler")``, checked and in a fixed order.

    Raises
    ------
    ValueError
        An unknown name, or an empty list.
    """
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    bad = [n for n in names if n not in FEATURE_SETS]
    if bad or not names:
        raise ValueError(f"features must be a comma list of {', '.join(FEATURE_SETS)}, not {text!r}")
    return tuple(s for s in FEATURE_SETS if s in names)


def require_cp_measure() -> None:
    """Raise ImportError naming the package when cp-measure is missing (it is a dependency of
    microsnoop-ray; an environment may still lack it)."""
    try:
        import cp_measure  # noqa: F401
    except ImportError:
        raise ImportError("--features cellprofiler needs cp-measure, a dependency of microsnoop-ray that this "
                          "environment lacks: pip install cp-measure") from None


def cellprofiler_name(key: str, compartment: str = COMPARTMENT) -> str | None:
    """One cp-measure column -> its CellProfiler name in ``compartment``, or None when it is left out
    (positions; the second order of a symmetric pair is decided by :func:`cellprofiler_names`)."""
    parts = key.split("__")
    measure, chans = parts[0], parts[1:]
    if measure.startswith(_POSITION):
        return None
    if not chans:
        return f"{compartment}_AreaShape_{measure}"
    if len(chans) == 2:
        a, b = chans
        name = measure.removeprefix("Correlation_")
        if name == "Pearson":
            return f"{compartment}_Correlation_Correlation_{a}_{b}"
        if name.endswith(("_1", "_2")):
            first, second = (a, b) if name.endswith("_1") else (b, a)
            return f"{compartment}_Correlation_{name[:-2]}_{first}_{second}"
        return f"{compartment}_Correlation_{name}_{a}_{b}"
    ch = chans[0]
    if measure.startswith("Intensity_"):
        return f"{compartment}_{measure}_{ch}"
    if measure.startswith("Granularity_"):
        return f"{compartment}_{measure}_{ch}"
    if measure.startswith("RadialDistribution_"):
        kind, _, rest = measure.removeprefix("RadialDistribution_").partition("_")
        return f"{compartment}_RadialDistribution_{kind}_{ch}_{rest}"
    name, _, scale = measure.partition("_")  # Haralick texture: <Feature>_<scale>_<angle>_<levels>
    return f"{compartment}_Texture_{name}_{ch}_{scale}"


def _config(channels: tuple[str, ...], scale_max: int) -> dict:
    from cp_measure.featurizer import make_featurizer_config

    return make_featurizer_config(list(channels), objects=["Cells"],
                                  correlation_costes_params={"scale_max": scale_max})


@functools.lru_cache(maxsize=32)
def _layout(channels: tuple[str, ...]) -> tuple[tuple[str, ...], np.ndarray]:
    """(CellProfiler names without the compartment, the cp-measure columns they come from): fixed for
    a list of channels, read off one synthetic object so that every site of a run has the same columns."""
    size = 32
    yy, xx = np.indices((size, size))
    mask = (((yy - 15.5) ** 2 + (xx - 15.5) ** 2) < 100).astype(np.int32)
    rng = np.random.default_rng(0)
    image = rng.random((len(channels), size, size))
    keys = _featurize(image, mask, channels, 65535)[1]
    names, index, seen = [], [], set()
    for i, k in enumerate(keys):
        n = cellprofiler_name(k, "")
        if n is not None and n not in seen:
            seen.add(n)
            names.append(n[1:])
            index.append(i)
    return tuple(names), np.asarray(index)


def cellprofiler_names(channel_names: Sequence[str], compartments: Sequence[str] = (COMPARTMENT,)) -> list[str]:
    """The CellProfiler columns measured for these channels, compartment by compartment, in the order
    :func:`measure_object` (one compartment) and :func:`measure_compartments` (three) return."""
    require_cp_measure()
    suffixes = _layout(tuple(channel_names))[0]
    return [f"{c}_{s}" for c in compartments for s in suffixes]


def _featurize(image: np.ndarray, mask: np.ndarray, channels: tuple[str, ...], scale_max: int):
    """cp-measure on one object; ``scale_max``: the Costes threshold search's levels (the pixel type's maximum)."""
    from cp_measure.featurizer import featurize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cp-measure's divide-by-zero warnings: their NaNs are the rule
        with np.errstate(all="ignore"):
            data, cols, _ = featurize(image[None], mask[None, None], _config(channels, scale_max))
    return data[0], cols


#: integer depths a float image of raw intensities is read as (8, 12 and 16 bits)
FLOAT_DEPTHS = (255.0, 4095.0, 65535.0)


def intensity_scale(dtype, peak: float | None = None) -> float:
    """What the pixels are divided by before cp-measure (the module's pixel-scale rule).

    Parameters
    ----------
    dtype : numpy dtype of the pixels
    peak : float, optional
        The largest absolute pixel value of the float image or set (ignored for integer types).

    Returns
    -------
    float: the integer type's maximum; for floats 1 when ``peak <= 1``, else the smallest of
    :data:`FLOAT_DEPTHS` that is at least ``peak``, else ``2**ceil(log2(peak + 1)) - 1``.
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        return float(np.iinfo(dtype).max)
    if dtype.kind == "b":
        return 1.0
    if peak is None or not np.isfinite(peak) or peak <= 1.0:
        return 1.0
    for depth in FLOAT_DEPTHS:
        if peak <= depth:
            return depth
    return float(2.0 ** np.ceil(np.log2(peak + 1.0)) - 1.0)


def peak(images: np.ndarray) -> float:
    """The largest finite absolute value of ``images`` (0 for none): what :func:`intensity_scale` needs."""
    images = np.asarray(images)
    a = np.abs(images.astype(np.promote_types(images.dtype, np.float32), copy=False))  # float32 stays float32
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else 0.0


def image_scale(images: np.ndarray) -> float:
    """:func:`intensity_scale` of an image or set of images, from its dtype and (floats) its peak."""
    return intensity_scale(images.dtype, peak(images) if np.dtype(images.dtype).kind == "f" else None)


def measure_object(image: np.ndarray, mask: np.ndarray, channel_names: Sequence[str],
                   scale: float | None = None) -> np.ndarray:
    """CellProfiler measurements of one object.

    Parameters
    ----------
    image : ndarray (C, H, W), any numeric dtype
        The object's window of the field (or a cell crop).
    mask : ndarray (H, W), bool or int
        Nonzero on the object.
    channel_names : sequence of C str
    scale : float, optional
        What the pixels are divided by (:func:`intensity_scale`); default :func:`image_scale` of ``image``.

    Returns
    -------
    ndarray (D,) float64, in the order of :func:`cellprofiler_names`; NaN where a measure is
    undefined (the module's rule).

    Raises
    ------
    MeasureError
        The object is empty, or cp-measure fails on it.
    """
    channels = tuple(channel_names)
    names, index = _layout(channels)
    mask = np.asarray(mask) != 0
    if not mask.any():
        raise MeasureError("its object has no pixels in the window")
    scale = image_scale(image) if scale is None else float(scale)
    pixels = np.asarray(image, np.float64) / scale
    try:
        values, _ = _featurize(pixels, mask.astype(np.int32), channels, 65535 if scale == 1.0 else int(scale))
    except (ValueError, IndexError, ZeroDivisionError, FloatingPointError, np.linalg.LinAlgError) as exc:
        raise MeasureError(f"cp-measure failed on it ({type(exc).__name__}: {str(exc)[:160]})") from None
    out = np.asarray(values, np.float64)[index]
    out[~np.isfinite(out)] = np.nan
    return out


def measure_compartments(image: np.ndarray, nucleus: np.ndarray, cell: np.ndarray, channel_names: Sequence[str],
                         scale: float | None = None) -> np.ndarray:
    """CellProfiler measurements of one cell's three compartments (:data:`COMPARTMENTS`).

    Parameters
    ----------
    image : ndarray (C, H, W)
        A window of the field holding the cell.
    nucleus, cell : ndarray (H, W), bool
        The cell's nucleus and the whole cell; the cytoplasm is ``cell & ~nucleus``.
    channel_names : sequence of C str
    scale : float, optional
        As :func:`measure_object` (one divisor for the three).

    Returns
    -------
    ndarray (3 D,) float64: Nuclei, then Cells, then Cytoplasm, in the order of
    ``cellprofiler_names(channel_names, COMPARTMENTS)``.

    Raises
    ------
    MeasureError
        Naming the compartment that could not be measured (e.g. no cytoplasm: the nucleus fills the cell).
    """
    nucleus, cell = np.asarray(nucleus, bool), np.asarray(cell, bool)
    scale = image_scale(image) if scale is None else float(scale)
    out = []
    for name, mask in zip(COMPARTMENTS, (nucleus, cell, cell & ~nucleus)):
        try:
            out.append(measure_object(image, mask, channel_names, scale))
        except MeasureError as exc:
            raise MeasureError(f"{name}: {exc}") from None
    return np.concatenate(out)


def measure_cells(image: np.ndarray, nuclei: np.ndarray, cells: np.ndarray, numbers: Sequence[int],
                  channel_names: Sequence[str]) -> tuple[np.ndarray, dict[int, str]]:
    """Measure the three compartments of every matched cell of a field, each in its own bounding box.

    Parameters
    ----------
    image : ndarray (C, H, W)
    nuclei, cells : ndarray (H, W) int
        Label images where a cell carries its nucleus's number
        (:func:`~microsnoop_ray.segment.match.match_cells`).
    numbers : sequence of int
        The objects (nucleus numbers) to measure.

    Returns
    -------
    values : ndarray (M, 3 D) float64, NaN rows for the cells that failed
    failed : dict object number -> reason
    """
    from scipy import ndimage as ndi

    out = np.full((len(numbers), len(cellprofiler_names(channel_names, COMPARTMENTS))), np.nan)
    failed: dict[int, str] = {}
    scale = image_scale(image)
    top = int(max(nuclei.max(initial=0), cells.max(initial=0)))
    nuc_boxes, cell_boxes = ndi.find_objects(nuclei, top), ndi.find_objects(cells, top)
    for i, obj in enumerate(int(o) for o in numbers):
        boxes = [b for b in (nuc_boxes[obj - 1], cell_boxes[obj - 1]) if b is not None]
        if len(boxes) < 2:
            failed[obj] = "CellProfiler measurements: it has no " + ("nucleus" if nuc_boxes[obj - 1] is None else "cell")
            continue
        win = tuple(slice(min(b[k].start for b in boxes), max(b[k].stop for b in boxes)) for k in range(2))
        try:
            out[i] = measure_compartments(image[(slice(None),) + win], nuclei[win] == obj, cells[win] == obj,
                                          channel_names, scale)
        except MeasureError as exc:
            failed[obj] = f"CellProfiler measurements: {exc}"
    return out, failed


def measure_windows(image: np.ndarray, labels: np.ndarray, objects, channel_names: Sequence[str],
                    ) -> tuple[np.ndarray, dict[int, str]]:
    """Measure every object of a field on its own label, inside its crop window.

    Parameters
    ----------
    image : ndarray (C, H, W)
    labels : ndarray (H, W) int
        The site's label image (Cellpose, classical or supplied objects).
    objects : DataFrame
        ``Metadata_ObjectNumber`` (the label) and the window ``Metadata_Crop_Top/Bottom/Left/Right``
        (the cell region the crop was cut from, :func:`~microsnoop_ray.crop.windows.crop_windows`).

    Returns
    -------
    values : ndarray (M, D) float64, NaN rows for the objects that failed
    failed : dict object number -> reason
    """
    names = cellprofiler_names(channel_names)
    out = np.full((len(objects), len(names)), np.nan)
    failed = {}
    scale = image_scale(image)
    cols = ["Metadata_ObjectNumber", "Metadata_Crop_Top", "Metadata_Crop_Bottom", "Metadata_Crop_Left",
            "Metadata_Crop_Right"]
    for i, (obj, t, b, l, r) in enumerate(objects[cols].to_numpy(np.int64)):
        try:
            out[i] = measure_object(image[:, t:b, l:r], labels[t:b, l:r] == obj, channel_names, scale)
        except MeasureError as exc:
            failed[int(obj)] = f"CellProfiler measurements: {exc}"
    return out, failed


def nearest_object_masks(images: np.ndarray, channels: Sequence[int] | None = None,
                         sigma: float = 1.0) -> np.ndarray:
    """One object per crop: the Otsu foreground component nearest the crop centre, holes filled.

    For cells that come as crops without masks (``embed``, cell arrays).

    Parameters
    ----------
    images : ndarray (n, c, h, w)
    channels : list of int, optional
        Channels whose 1-99 percentile-normalised sum is thresholded (default: all).

    Returns
    -------
    ndarray (n, h, w) int32, 1 inside the object and 0 elsewhere. A crop with no foreground
    gets the whole crop as its object (so every crop is measured).
    """
    from scipy import ndimage as ndi
    from skimage.filters import gaussian, threshold_otsu

    from ..model.preprocess import normalize_percentile

    n, c, h, w = images.shape
    sel = list(range(c)) if channels is None else list(channels)
    out = np.zeros((n, h, w), np.int32)
    yy, xx = np.indices((h, w))
    d2 = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2
    for i in range(n):
        g = gaussian(normalize_percentile(images[i, sel].astype(np.float32)).sum(0), sigma)
        lab, k = ndi.label(g > threshold_otsu(g)) if g.max() > g.min() else (None, 0)
        if k == 0:
            out[i] = 1
            continue
        nearest = 1 + int(np.argmin(ndi.minimum(d2, lab, np.arange(1, k + 1))))
        out[i] = ndi.binary_fill_holes(lab == nearest)
    return out


def object_masks(masks: np.ndarray) -> np.ndarray:
    """Supplied masks (n, h, w) -> one object per crop: the label under the crop centre, else the
    label nearest to it (a crop's mask may show its neighbours too)."""
    from scipy import ndimage as ndi

    masks = np.asarray(masks)
    n, h, w = masks.shape
    yy, xx = np.indices((h, w))
    d2 = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2
    out = np.zeros((n, h, w), np.int32)
    for i in range(n):
        ids = np.unique(masks[i])
        ids = ids[ids != 0]
        if len(ids):
            nearest = ids[int(np.argmin(ndi.minimum(d2, masks[i], ids)))]
            out[i] = masks[i] == nearest
    return out


def measure_crops(crops: np.ndarray, channel_names: Sequence[str], masks: np.ndarray | None = None,
                  scale: float | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """Measure pre-cropped cells, one object per crop.

    Parameters
    ----------
    crops : ndarray (n, C, h, w)
    masks : ndarray (n, h, w) int, optional
        Given masks (:func:`object_masks` picks each crop's own object); default
        :func:`nearest_object_masks`.
    scale : float, optional
        What the pixels are divided by; default :func:`image_scale` of the whole set, so every crop
        of it is on one scale.

    Returns
    -------
    values : ndarray (n, D) float64, NaN rows for the crops that failed
    failed : dict crop index -> reason
    """
    names = cellprofiler_names(channel_names)
    objs = nearest_object_masks(crops) if masks is None else object_masks(masks)
    out = np.full((len(crops), len(names)), np.nan)
    failed = {}
    scale = image_scale(crops) if scale is None else scale
    for i in range(len(crops)):
        try:
            out[i] = measure_object(crops[i], objs[i], channel_names, scale)
        except MeasureError as exc:
            failed[i] = f"CellProfiler measurements: {exc}"
    return out, failed
