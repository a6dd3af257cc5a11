"""The one-channel pretraining pool, its type-alternating sampler and the augmentation.

docs/METHOD.md section 2: every channel of every image is split out into a one-channel
image; RGB pictures are converted to grey; each batch is drawn from one image
*type*, types taken in turn, so that a large source does not dominate a small one.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import cv2
import numpy as np

from ..errors import InputError
from ..model.preprocess import normalize_percentile, pad_center
from ..segment.classical import DIAMETER

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


@dataclasses.dataclass
class Pool:
    """One-channel images grouped by type.

    Attributes
    ----------
    planes : list of ndarray, each (h, w)
        Stored in their original dtype (converted to float32 when sampled).
    types : list of str
        The image type of each plane (same length as ``planes``).
    sources : list of str
        Where each plane came from (file and channel), for the model card.
    """

    planes: list
    types: list
    sources: list
    skipped: list = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.planes)

    def by_type(self) -> dict[str, np.ndarray]:
        """Indices of the planes of each type, types in sorted order."""
        t = np.asarray(self.types)
        return {name: np.flatnonzero(t == name) for name in sorted(set(self.types))}

    def summary(self) -> dict:
        """Planes and pixels per type (for logs and the model card)."""
        out = {}
        for name, idx in self.by_type().items():
            out[name] = {"planes": int(idx.size), "megapixels": round(sum(self.planes[i].size for i in idx) / 1e6, 2)}
        return out

    def extend(self, other: "Pool") -> None:
        self.planes += other.planes
        self.types += other.types
        self.sources += other.sources
        self.skipped += other.skipped


def to_planes(image: np.ndarray, rgb: str = "grey") -> list[np.ndarray]:
    """Split an image into one-channel planes.

    (h, w) -> one plane; (h, w, 3|4) RGB(A) -> one grey plane (ITU-R 601 luma, or the
    single channel when all three are equal) with ``rgb="grey"`` (histology), or its
    non-empty colour channels with ``rgb="split"`` (fluorescence composites);
    (c, h, w) and higher -> one plane per leading index.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        return [image]
    if image.ndim == 3 and image.shape[-1] in (3, 4) and image.shape[0] > 4:
        rgb_ = image[..., :3]
        if np.array_equal(rgb_[..., 0], rgb_[..., 1]) and np.array_equal(rgb_[..., 0], rgb_[..., 2]):
            return [rgb_[..., 0]]
        if rgb == "split":
            return [rgb_[..., c] for c in range(3) if rgb_[..., c].max() > rgb_[..., c].min()]
        rgb = rgb_
        grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return [grey]
    if image.ndim >= 3:
        return [p for p in image.reshape((-1,) + image.shape[-2:])]
    raise ValueError(f"cannot split an image of shape {image.shape} into planes")


def read_picture(path: Path) -> np.ndarray:
    """Read a TIFF with tifffile, anything else (PNG/JPEG) with OpenCV keeping its bit depth."""
    if path.suffix.lower() in (".tif", ".tiff"):
        from ..io.arrays import read_tiff
        return read_tiff(path)
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{path}: not a readable image")
    if img.ndim == 3:
        img = img[..., ::-1] if img.shape[-1] == 3 else img[..., [2, 1, 0, 3]]  # BGR(A) -> RGB(A)
    return img


def pool_from_folder(folder: str | Path, image_type: str | None = None, type_from: str = "subfolder",
                     min_side: int = 32, exclude: str | None = None, rgb: str = "grey") -> Pool:
    """Every picture under ``folder`` (recursively), every channel split out.

    Parameters
    ----------
    image_type : str, optional
        One type for everything in the folder.
    type_from : {"subfolder", "folder"}
        Without ``image_type``: ``subfolder`` types each picture by the first folder
        below ``folder`` (e.g. the CellProfiler example set), ``folder`` by ``folder``'s name.
    min_side : int
        Planes smaller than this on either side are left out (with a log line).
    exclude : str, optional
        A glob on file names to leave out (e.g. ``"*_masks*"``).
    rgb : {"grey", "split"}
        See :func:`to_planes`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"pretraining source {folder} is not a folder")
    planes, types, sources, skipped = [], [], [], []
    from ..io.sources import image_files

    for path in image_files(folder, IMAGE_SUFFIXES):
        rel = path.relative_to(folder)
        if exclude and fnmatch.fnmatch(path.name, exclude):
            continue
        kind = image_type or (rel.parts[0] if type_from == "subfolder" and len(rel.parts) > 1 else folder.name)
        try:
            image = read_picture(path)
        except Exception as exc:  # unreadable files are reported, never fatal for the pool
            log.warning("pretraining pool: skipping %s (%s)", path, exc)
            skipped.append((str(path), str(exc)))
            continue
        for c, plane in enumerate(to_planes(image, rgb)):
            if min(plane.shape) < min_side:
                log.warning("pretraining pool: skipping %s channel %d (%dx%d is too small)", path, c, *plane.shape)
                skipped.append((f"{path}[{c}]", f"{plane.shape[0]}x{plane.shape[1]} is below {min_side} px"))
                continue
            planes.append(plane)
            types.append(kind)
            sources.append(f"{rel}[{c}]")
    return Pool(planes, types, sources, skipped)


def pool_from_cell_array(path: str | Path, image_type: str | None = None, key: str = "images") -> Pool:
    """Pre-cropped cells from an ``.npy`` or ``.npz`` array (n, c, h, w) or (n, h, w)."""
    path = Path(path)
    from ..io.arrays import load_array

    arr = load_array(path, key)
    if arr.ndim == 3:
        arr = arr[:, None]
    kind = image_type or path.stem
    planes = [arr[i, c] for i in range(arr.shape[0]) for c in range(arr.shape[1])]
    sources = [f"{path.name}[{i},{c}]" for i in range(arr.shape[0]) for c in range(arr.shape[1])]
    return Pool(planes, [kind] * len(planes), sources)


def pool_from_plate(path: str | Path, image_type: str | None = None) -> Pool:
    """Every channel of every field of an OME-Zarr HCS plate."""
    from ..io.sources import list_sources
    work = list_sources([path])
    kind = image_type or next(iter(work.plates))
    planes, sources = [], []
    for item in work.items:
        for c, plane in enumerate(to_planes(item.load())):
            planes.append(plane)
            sources.append(f"{item.plate}/{item.well}/{item.site}[{c}]")
    return Pool(planes, [kind] * len(planes), sources)


def cells_from_pool(pool: Pool, suffix: str = "-cells", diameter: float = DIAMETER, rescale_constant: float | None = None,
                    max_per_plane: int = 200, seed: int = 0) -> Pool:
    """Derive a single-cell type from full fields: classical segmentation, then cell-region crops.

    This puts cell-sized images padded with zeros (what inference sees in cell-cropping
    mode) into the pool, as the paper's pool held single-cell data sets beside fields.
    """
    from ..crop.windows import RESCALE_CONSTANT, crop_windows, object_bboxes
    rescale_constant = RESCALE_CONSTANT if rescale_constant is None else rescale_constant
    from ..segment.classical import segment_classical
    rng = np.random.default_rng(seed)
    planes, types, sources = [], [], []
    for plane, kind, src in zip(pool.planes, pool.types, pool.sources):
        if kind.endswith(suffix):
            continue
        labels = segment_classical(plane.astype(np.float32), diameter=diameter)
        if labels.max() == 0:
            continue
        boxes = object_bboxes(labels)
        win = crop_windows(boxes, plane.shape, rescale_constant)
        win = win[((win["bottom"] - win["top"]) >= 8) & ((win["right"] - win["left"]) >= 8)]
        for w in win.iloc[rng.permutation(len(win))[:max_per_plane]].itertuples(index=False):
            planes.append(np.ascontiguousarray(plane[w.top:w.bottom, w.left:w.right]))
            types.append(kind + suffix)
            sources.append(f"{src}#{int(w.label)}")
    return Pool(planes, types, sources)


def build_pool(sources: Sequence[Mapping]) -> Pool:
    """Build the pool from source descriptions.

    Each source is a mapping with ``kind`` (``folder``, ``cells``, ``plate`` or
    ``registry``) and ``path`` (for ``registry``: ``name``, a data set of
    :func:`~microsnoop_ray.io.datasets.fetch_package_files`, and ``path`` inside it),
    optionally ``type`` (a fixed image type), ``exclude`` and ``rgb`` (folders), and
    ``derive_cells`` (bool: also add cell crops of its fields as a ``<type>-cells`` type).
    """
    pool = Pool([], [], [])
    for src in sources:
        kind = src.get("kind", "folder")
        if kind in ("folder", "registry"):
            path = Path(src["path"])
            if kind == "registry":
                from ..io.datasets import fetch_package_files
                path = fetch_package_files(src["name"]) / src.get("path", "")
            part = pool_from_folder(path, src.get("type"), exclude=src.get("exclude"), rgb=src.get("rgb", "grey"))
        elif kind == "cells":
            part = pool_from_cell_array(src["path"], src.get("type"))
        elif kind == "plate":
            part = pool_from_plate(src["path"], src.get("type"))
        else:
            raise ValueError(f"unknown pretraining source kind {kind!r} (folder, cells or plate)")
        if not len(part):
            why = "; ".join(f"{p}: {r}" for p, r in part.skipped[:3]) or "no image files"
            raise InputError(path if kind in ("folder", "registry") else src["path"],
                             f"pretraining source gave no image ({len(part.skipped)} skipped): {why}")
        if src.get("derive_cells"):
            part.extend(cells_from_pool(part, diameter=float(src.get("diameter", DIAMETER))))
        pool.extend(part)
    if not len(pool):
        raise ValueError("the pretraining pool is empty: no readable images in the sources")
    return pool


def augment(plane: np.ndarray, size: int, rng: np.random.Generator, scale_range=(0.5, 1.5),
            rotate: bool = True, flip: bool = True) -> np.ndarray:
    """One training target: random crop (zero-padded if smaller), normalise, rotate, scale, flip.

    Parameters
    ----------
    plane : ndarray, shape (h, w)
    size : int
        Output side (224 in the paper).

    Returns
    -------
    ndarray, shape (size, size), float32
    """
    h, w = plane.shape
    top = int(rng.integers(0, h - size + 1)) if h > size else 0
    left = int(rng.integers(0, w - size + 1)) if w > size else 0
    out = normalize_percentile(pad_center(plane[top:top + size, left:left + size], size)[None])[0]
    angle = float(rng.uniform(0.0, 360.0)) if rotate else 0.0
    scale = float(rng.uniform(*scale_range))
    m = cv2.getRotationMatrix2D(((size - 1) / 2.0, (size - 1) / 2.0), angle, scale)
    out = cv2.warpAffine(out, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out, dtype=np.float32)


class TypeAlternatingSampler:
    """Batches of augmented targets, each batch from one image type, types in turn.

    Parameters
    ----------
    pool : Pool
    batch_size : int
    size : int
    seed : int
        Different workers pass different seeds (data parallelism draws, it does not shard).
    """

    def __init__(self, pool: Pool, batch_size: int, size: int, seed: int = 0, scale_range=(0.5, 1.5)):
        self.pool = pool
        self.batch_size = batch_size
        self.size = size
        self.scale_range = tuple(scale_range)
        self.groups = list(pool.by_type().values())
        self.names = list(pool.by_type())
        self.rng = np.random.default_rng(seed)
        self.turn = int(self.rng.integers(len(self.groups)))

    def next_batch(self) -> tuple[np.ndarray, str]:
        """Return (targets (batch, 1, size, size) float32, image type)."""
        g = self.turn % len(self.groups)
        self.turn += 1
        idx = self.rng.choice(self.groups[g], size=self.batch_size, replace=True)
        batch = np.stack([augment(self.pool.planes[i], self.size, self.rng, self.scale_range) for i in idx])
        return batch[:, None], self.names[g]

    def __iter__(self) -> Iterator[tuple[np.ndarray, str]]:
        """Endless :meth:`next_batch` results."""
        while True:
            yield self.next_batch()


def batch_stream(pool: Pool, batch_size: int, size: int, seed: int = 0, scale_range=(0.5, 1.5),
                 workers: int = 0, pin_memory: bool = False) -> Iterator:
    """An endless stream of ``(targets, image type)`` batches, augmented in ``workers`` processes.

    With ``workers=0`` the batches are made in this process (one
    :class:`TypeAlternatingSampler` seeded with ``seed``). Otherwise each loader
    process runs its own sampler, seeded with ``seed`` and its index, and the
    stream takes their batches in turn (deterministic for a given worker count):
    a GPU consumes a 224 batch faster than one core augments it.

    Yields
    ------
    targets : Tensor, shape (batch_size, 1, size, size), float32
    image_type : str
    """
    import torch

    def tensors(sampler_seed: int):
        sampler = TypeAlternatingSampler(pool, batch_size, size, seed=sampler_seed, scale_range=scale_range)
        return ((torch.from_numpy(batch), kind) for batch, kind in sampler)

    if workers <= 0:
        yield from tensors(seed)

    class _Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            cv2.setNumThreads(1)
            return tensors(seed * 1009 + torch.utils.data.get_worker_info().id + 1)

    loader = torch.utils.data.DataLoader(_Batches(), batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                         prefetch_factor=4, persistent_workers=True)
    # OpenCV's thread pool does not survive fork(): a child forked while the parent's pool
    # exists hangs in its first warpAffine. Fork the loader processes with the pool shut down.
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        batches = iter(loader)
    finally:
        cv2.setNumThreads(threads)
    yield from batches
