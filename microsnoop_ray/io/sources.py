"""Work items: the one place where the kinds of input are told apart.

Every input the package accepts becomes a list of typed, frozen, picklable work items. Each
item knows how to read its pixels (:meth:`WorkItem.load`) and how to name itself in errors
(:attr:`WorkItem.where`: plate, well, site and file). Inputs:

``ZarrField``   one field of an OME-Zarr HCS plate (NGFF 0.4 / 0.5), optionally with a label image
``FileField``   one field from image files: a row of an image table (``Path_<Channel>`` columns,
                ``load_data.csv``: one file per channel) or one loose image file (its channels)
``CellChunk``   a chunk of pre-cropped cells of one site, rows of a cell array (``.npy``/``.npz``)

:func:`list_sources` expands the inputs of ``profile`` and ``fields``; the pretraining pool and
``embed`` (:func:`read_image_stack`) read the same files through :func:`image_files` and
:func:`~microsnoop_ray.io.arrays.load_array`.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd

from ..errors import DUPLICATE_FIELD, InputError
from .arrays import TIFF_SUFFIXES, load_array, npz_columns, read_tiff
from .images import read_field
from .tables import read_cell_array, read_image_table, sample_per_group, with_metadata_prefix
from .zarr_plate import FieldRef, open_plate

#: Suffixes of image files read as whole fields (``read_field``).
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".npy")
TABLE_SUFFIXES = (".parquet", ".csv", ".tsv", ".gz")
ARRAY_SUFFIXES = (".npz", ".npy")
#: Cells per work item of a cell array (a site with more cells is split into chunks).
CELLS_PER_CHUNK = 256


class SiteKey(NamedTuple):
    """A site: ``(plate, well, site)``. A tuple, so any plate name (``|`` included) works as a key.
    Loose image files have no well (``None``); their site is their position in the list (from 1)."""

    plate: str
    well: str | None
    site: int


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One unit of work: a field of view, or a chunk of pre-cropped cells of one site.

    Attributes
    ----------
    plate, well, site : the site the item belongs to
    n_channels : int, channels the pixels must have
    nuclei_channel : int, channel index segmentation uses
    cell_channel : int, optional
        A cytoplasmic channel: cells are segmented on it (with the nuclei channel) besides the nuclei
    illum : tuple of str, illumination-function files (one per channel), empty for none
    centres_file : str, optional
        A table of the field's object centres (CellProfiler's ``Nuclei_Location_Center_X/Y``; the
        DeepProfiler ``locations/`` layout) to crop around instead of segmenting
    object_size : float, optional
        The object diameter the crop windows of supplied centres assume (default: the segmentation's)
    """

    plate: str
    well: str | None
    site: int
    n_channels: int
    nuclei_channel: int = 0
    cell_channel: int | None = None
    illum: tuple[str, ...] = ()
    centres_file: str | None = None
    object_size: float | None = None

    @property
    def key(self) -> SiteKey:
        return SiteKey(self.plate, self.well, int(self.site))

    @property
    def where(self) -> str:
        """How errors name the item: ``plate P, well W, site S`` (and the file, where there is one)."""
        return f"plate {self.plate}, well {self.well}, site {self.site}"

    @property
    def file_name(self) -> str | None:
        """``Metadata_FileName`` of the item (None where there is no single file)."""
        return None

    def pixels(self) -> np.ndarray:
        """The stored pixels: (C, H, W) for fields, (n, C, h, w) for cell chunks. Raises InputError."""
        raise NotImplementedError

    def load(self) -> np.ndarray:
        """:meth:`pixels`, illumination-corrected when ``illum`` is set, with the channel count checked.

        Raises
        ------
        InputError
            Naming :attr:`where` and what is wrong.
        """
        image = self.pixels()
        if self.illum:
            from .illum import correct, load_functions
            image = correct(image, load_functions(self.illum))
        got = image.shape[1] if isinstance(self, CellChunk) else image.shape[0]
        if got != self.n_channels:
            raise InputError(self.where, f"{got} channels, but the plate has {self.n_channels}")
        return image

    def labels(self) -> np.ndarray | None:
        """A label image supplied with the field (None: segment it)."""
        return None

    #: the item is cells already cropped (their crops are what the encoder sees), not a field
    precropped = False

    def crop_side(self) -> int | None:
        """The largest side of a pre-cropped item's cells (None for a field, whose crops are cut later)."""
        return None

    @property
    def supplied_objects(self) -> str | None:
        """``"labels"`` or ``"centres"`` when the item brings its objects (no segmentation), else None."""
        return "centres" if self.centres_file else None

    def object_centres(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(x, y, label)`` of the supplied object centres (None: none supplied). Raises InputError
        naming the site and the file when the file is missing or unreadable."""
        if not self.centres_file:
            return None
        from .images import read_centres

        if not Path(self.centres_file).is_file():
            raise InputError(self.where, f"no object centres file {self.centres_file}")
        df = read_centres(self.centres_file)
        return df["x"].to_numpy(float), df["y"].to_numpy(float), df["label"].to_numpy(np.int64)


@dataclasses.dataclass(frozen=True)
class ZarrField(WorkItem):
    """A field of an OME-Zarr plate: ``path`` is the plate folder, ``group`` the image group
    (``A/1/0``), ``label_name`` an NGFF label image to use instead of segmenting."""

    path: str = ""
    group: str = ""
    label_name: str | None = None

    def _ref(self) -> FieldRef:
        return FieldRef(self.plate, self.well, int(self.site), self.group)

    def pixels(self) -> np.ndarray:
        return open_plate(self.path, name=self.plate).read(self._ref())

    @property
    def supplied_objects(self) -> str | None:
        return "labels" if self.label_name else super().supplied_objects

    def labels(self) -> np.ndarray | None:
        if not self.label_name:
            return None
        lab = open_plate(self.path, name=self.plate).read_labels(self._ref(), self.label_name)
        if lab is None:
            raise InputError(self.where, f"no label image {self.label_name!r} (plate {self.path})")
        return lab


@dataclasses.dataclass(frozen=True)
class FileField(WorkItem):
    """A field from image files: one file per channel (image tables) or one file holding every
    channel (loose images). ``label_file`` is a label image to use instead of segmenting;
    ``centres`` object centres ``((x, y, label), ...)`` with ``object_size`` (crop around them)."""

    files: tuple[str, ...] = ()
    label_file: str | None = None
    centres: tuple[tuple[float, float, int], ...] | None = None

    @property
    def where(self) -> str:
        if self.well is None:
            return str(self.files[0])
        return f"plate {self.plate}, well {self.well}, site {self.site}"

    @property
    def file_name(self) -> str | None:
        return Path(self.files[0]).name if len(self.files) == 1 else None

    def pixels(self) -> np.ndarray:
        planes = [read_field(p) for p in self.files]
        shapes = {p.shape[1:] for p in planes}
        if len(shapes) != 1:
            raise InputError(self.where, f"channel images differ in size: {sorted(shapes)}")
        return planes[0] if len(planes) == 1 else np.concatenate(planes, axis=0)

    @property
    def supplied_objects(self) -> str | None:
        return "labels" if self.label_file else "centres" if self.centres is not None else super().supplied_objects

    def object_centres(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if self.centres is None:
            return super().object_centres()
        if not self.centres:
            return np.zeros(0), np.zeros(0), np.zeros(0, np.int64)
        x, y, lab = zip(*self.centres)
        return np.asarray(x, float), np.asarray(y, float), np.asarray(lab, np.int64)

    def labels(self) -> np.ndarray | None:
        if not self.label_file:
            return None
        lab = read_field(self.label_file)
        if lab.shape[0] != 1:
            raise InputError(self.label_file, f"label image has {lab.shape[0]} channels; expected one")
        return lab[0].astype(np.int64)


@functools.lru_cache(maxsize=2)
def _cell_array(path: str, mtime: float) -> np.ndarray:
    return load_array(path)


@dataclasses.dataclass(frozen=True)
class CellChunk(WorkItem):
    """Pre-cropped cells of one site: rows ``rows`` of the cell array at ``path``, with their object
    numbers; ``site_planes`` is the number of (cell, channel) planes of the whole site (a site may
    be split into several chunks)."""

    path: str = ""
    rows: tuple[int, ...] = ()
    object_numbers: tuple[int, ...] = ()
    site_planes: int = 0

    precropped = True

    def crop_side(self) -> int | None:
        return int(max(_cell_array(self.path, Path(self.path).stat().st_mtime).shape[-2:]))

    def pixels(self) -> np.ndarray:
        path = Path(self.path)
        if not path.is_file():
            raise InputError(path, "cell array does not exist (moved or deleted since the work was listed?)")
        # opened once per worker process: .npy memory-mapped, .npz loaded
        arr = _cell_array(self.path, path.stat().st_mtime)
        cells = np.ascontiguousarray(arr[list(self.rows)])
        return cells[:, None] if cells.ndim == 3 else cells


@dataclasses.dataclass
class PlateInfo:
    """A plate of the inputs: its batch, channel names, source and sites."""

    name: str
    batch: str
    channels: list[str]
    source: str
    sites: list[SiteKey]


@dataclasses.dataclass
class Work:
    """What :func:`list_sources` found: the work items, the plates, and input problems that are no
    site's (duplicate table rows), as rows of the skipped table."""

    items: list[WorkItem]
    plates: dict[str, PlateInfo]
    problems: list[dict]


def is_plate_folder(path: Path) -> bool:
    return path.is_dir() and ((path / ".zattrs").exists() or (path / "zarr.json").exists())


def channel_index(value, channels: Sequence[str], where, what: str = "nuclei channel") -> int | None:
    """The index of a channel given by name or index (InputError naming ``where`` and ``what``); None
    for None."""
    if value is None:
        return None
    if isinstance(value, str) and not value.isdigit():
        if value not in channels:
            raise InputError(where, f"{what} {value!r} is not one of the channels {list(channels)}")
        return list(channels).index(value)
    idx = int(value)
    if not 0 <= idx < max(1, len(channels)):
        raise InputError(where, f"{what} index {idx} is out of range for {len(channels)} channels")
    return idx


def image_files(folder: str | Path, suffixes: Sequence[str] = IMAGE_SUFFIXES, recursive: bool = True) -> list[Path]:
    """The image files in ``folder`` (and, ``recursive``, below it), sorted."""
    folder = Path(folder)
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in suffixes)


def list_sources(inputs: Sequence[str | Path], batch: str = "default", nuclei_channel: int | str = 0,
                 labels: str | None = None, cell_table: str | None = None, channel_names: Sequence[str] | None = None,
                 max_cells_per_site: int | None = None, seed: int = 0, cells_per_chunk: int = CELLS_PER_CHUNK,
                 masks: Sequence[str | Path] | None = None, centres: pd.DataFrame | None = None,
                 object_size: float | None = None, locations: str | Path | None = None,
                 cell_channel: int | str | None = None) -> Work:
    """Expand inputs into work items.

    Parameters
    ----------
    inputs : paths
        OME-Zarr plate folders, image tables (``.parquet``/``.csv``), cell arrays (``.npz``/``.npy``
        with ``cell_table``) and loose image files (TIFF/PNG/JPEG/.npy fields: one site each, of a
        plate named after their folder, without a well).
    labels : str, optional
        NGFF label image of each Zarr field to use instead of segmenting.
    masks : paths, optional
        One label image per loose image file, in the same order.
    centres : DataFrame, optional
        Object centres for loose image files (``x``, ``y``, ``label``, ``file``; see
        :func:`~microsnoop_ray.io.images.read_centres`), cropped with ``object_size``.
    cell_channel : str or int, optional
        A cytoplasmic channel of the fields of plates and image tables, segmented into cells.
    locations : path, optional
        A folder of supplied nucleus centres for the fields of plates and image tables,
        ``<locations>/<plate>/<well>-<site>-Nuclei.csv`` (:func:`locations_file`), cropped with
        ``object_size`` instead of segmenting; a site without its file is skipped with the reason.

    Raises
    ------
    InputError
        For an input that is none of these, or a plate given twice; per-field problems surface
        when the item is read.
    """
    lister = _Lister(dict(batch=batch, nuclei_channel=nuclei_channel, cell_channel=cell_channel, labels=labels,
                          cell_table=cell_table, channel_names=channel_names, max_cells_per_site=max_cells_per_site,
                          seed=seed, cells_per_chunk=cells_per_chunk, object_size=object_size, locations=locations))
    loose = [Path(p) for p in inputs if Path(p).suffix.lower() in IMAGE_SUFFIXES and Path(p).is_file()
             and not (Path(p).suffix.lower() == ".npy" and cell_table)]
    if masks is not None and len(masks) != len(loose):
        raise InputError("--masks", f"{len(masks)} label images for {len(loose)} image files")
    for path in (Path(p) for p in inputs):
        if path in loose:
            continue
        if is_plate_folder(path):
            lister.plate(path)
        elif path.suffix.lower() in TABLE_SUFFIXES and path.is_file():
            lister.table(path)
        elif path.suffix.lower() in ARRAY_SUFFIXES and path.is_file():
            lister.cells(path)
        else:
            raise InputError(path, "not an OME-Zarr plate folder, an image table (.parquet/.csv), a cell array "
                                   "(.npz/.npy) or an image file (.tif/.png/.jpg)")
    if loose:
        lister.loose(loose, masks, centres)
    return Work(lister.items, lister.plates, lister.problems)


def locations_file(folder: str | Path | None, plate: str, well: str, site: int) -> str | None:
    """``<folder>/<plate>/<well>-<site>-Nuclei.csv``: a site's nucleus centres in DeepProfiler's
    ``locations`` layout (CellProfiler's ``Nuclei_Location_Center_X/Y``); None without a folder."""
    return str(Path(folder) / str(plate) / f"{well}-{int(site)}-Nuclei.csv") if folder else None


class _Lister:
    """The work items, plates and problems of :func:`list_sources`, one method per kind of input
    (``opts``: that function's options)."""

    def __init__(self, opts: dict):
        self.opts = opts
        self.items: list[WorkItem] = []
        self.plates: dict[str, PlateInfo] = {}
        self.problems: list[dict] = []

    def add_plate(self, info: PlateInfo) -> None:
        if info.name in self.plates:
            raise InputError(info.source, f"plate {info.name} is also given by {self.plates[info.name].source}")
        self.plates[info.name] = info

    def _segmented(self, channels: Sequence[str], where) -> dict:
        """The field options every field of a plate shares: its nuclei and cell channels, supplied objects."""
        o = self.opts
        return {"nuclei_channel": channel_index(o["nuclei_channel"], channels, where),
                "cell_channel": channel_index(o["cell_channel"], channels, where, "cell channel"),
                "object_size": o["object_size"]}

    def plate(self, path: Path) -> None:
        plate = open_plate(path)
        fields = list(plate.fields())
        channels = plate.channel_names(fields[0]) if fields else []
        shared = self._segmented(channels, path)
        self.add_plate(PlateInfo(plate.name, self.opts["batch"], channels, str(path),
                                 [SiteKey(plate.name, f.well, f.site) for f in fields]))
        self.items += [ZarrField(plate.name, f.well, f.site, len(channels), path=str(path), group=f.path,
                                 label_name=self.opts["labels"] or None, **shared,
                                 centres_file=locations_file(self.opts["locations"], plate.name, f.well, f.site))
                       for f in fields]

    def table(self, path: Path) -> None:
        table, channels = read_image_table(path)
        shared = self._segmented(channels, path)
        dup = table.duplicated(["Metadata_Plate", "Metadata_Well", "Metadata_Site"], keep="first")
        self.problems += [{"Metadata_Plate": r.Metadata_Plate, "Metadata_Well": r.Metadata_Well,
                           "Metadata_Site": int(r.Metadata_Site), "kind": DUPLICATE_FIELD,
                           "reason": f"duplicate field in {path.name}; the first row was used"}
                          for r in table[dup].itertuples(index=False)]
        for name, sub in table[~dup].groupby("Metadata_Plate", sort=True):
            name = str(name)
            self.add_plate(PlateInfo(name, self.opts["batch"], channels, str(path),
                                     [SiteKey(name, w, int(s)) for w, s in zip(sub["Metadata_Well"],
                                                                               sub["Metadata_Site"])]))
            self.items += [FileField(name, r.Metadata_Well, int(r.Metadata_Site), len(channels), **shared,
                                     files=tuple(str(r[f"Path_{c}"]) for c in channels),
                                     illum=tuple(str(r[f"Illum_{c}"]) for c in channels if f"Illum_{c}" in r),
                                     centres_file=locations_file(self.opts["locations"], name, r.Metadata_Well,
                                                                 r.Metadata_Site))
                           for _, r in sub.iterrows()]

    def cells(self, path: Path) -> None:
        o = self.opts
        if o["locations"] or o["cell_channel"] is not None:
            raise InputError(path, "--locations and --cell-channel concern fields; a cell array is cells already cut")
        arr, meta = read_cell_array(path, o["cell_table"])
        channels = list(o["channel_names"] or [f"ch{i}" for i in range(arr.shape[1])])
        if len(channels) != arr.shape[1]:
            raise InputError(path, f"{len(channels)} channel names for {arr.shape[1]} channels")
        keys = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
        meta = meta.assign(_row=np.arange(len(meta)))
        if o["max_cells_per_site"]:
            meta = meta.iloc[sample_per_group(meta, keys, o["max_cells_per_site"], o["seed"])]
        for name, sub in meta.groupby("Metadata_Plate", sort=True):
            name = str(name)
            sites = sub[["Metadata_Well", "Metadata_Site"]].drop_duplicates()
            self.add_plate(PlateInfo(name, str(sub["Metadata_Batch"].iloc[0]) if "Metadata_Batch" in sub else o["batch"],
                                     channels, str(path), [SiteKey(name, w, int(s)) for w, s in
                                                           zip(sites["Metadata_Well"], sites["Metadata_Site"])]))
            for (well, site), cells in sub.groupby(["Metadata_Well", "Metadata_Site"], sort=True):
                for start in range(0, len(cells), o["cells_per_chunk"]):
                    part = cells.iloc[start:start + o["cells_per_chunk"]]
                    self.items.append(CellChunk(
                        name, well, int(site), len(channels), path=str(path), rows=tuple(part["_row"].astype(int).tolist()),
                        object_numbers=tuple(part["Metadata_ObjectNumber"].astype(int).tolist()),
                        site_planes=len(cells) * len(channels)))

    def loose(self, files: list[Path], masks, centres: pd.DataFrame | None) -> None:
        """Loose image files: the channel count is read from the first readable file (the others are
        checked when they are read)."""
        names = self.opts["channel_names"]
        n_channels = next((n for n in map(_channel_count, files) if n), None) or (len(names) if names else 1)
        channels = list(names or [f"ch{i}" for i in range(n_channels)])
        if len(channels) != n_channels:
            raise InputError(files[0], f"{len(channels)} channel names for {n_channels} channels")
        shared = self._segmented(channels, files[0])
        by_plate: dict[str, list[SiteKey]] = {}
        for i, f in enumerate(files):
            plate = f.parent.resolve().name or "fields"
            by_plate.setdefault(plate, []).append(SiteKey(plate, None, i + 1))
            pts = None
            if centres is not None:
                sel = centres if centres["file"].isna().all() else centres[centres["file"] == f.name]
                pts = tuple((float(x), float(y), int(lab)) for x, y, lab in zip(sel["x"], sel["y"], sel["label"]))
            self.items.append(FileField(plate, None, i + 1, n_channels, files=(str(f),), centres=pts, **shared,
                                        label_file=str(masks[i]) if masks is not None else None))
        for plate, keys in by_plate.items():
            self.add_plate(PlateInfo(plate, self.opts["batch"], channels, str(files[0].parent), keys))


def _channel_count(path: Path) -> int | None:
    """The channels of an image file, None when it cannot be read (it is skipped with its reason later)."""
    try:
        return read_field(path).shape[0]
    except InputError:
        return None


def read_image_stack(path: str | Path) -> tuple[object, pd.DataFrame]:
    """Open an image stack for :func:`microsnoop_ray.embed`.

    Parameters
    ----------
    path : str or Path
        ``.npy`` (memory-mapped), ``.npz`` with key ``images`` (other 1-D arrays
        of length N become ``Metadata_<key>`` columns), or a folder of TIFFs
        (sorted by name; ``Metadata_FileName`` is recorded).

    Returns
    -------
    images : ndarray (N, C, H, W) or list of (C, H, W) arrays
    metadata : DataFrame with N rows (possibly no columns)
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file or folder does not exist")
    if path.is_dir():
        files = image_files(path, TIFF_SUFFIXES, recursive=False)
        if not files:
            raise InputError(path, "folder holds no .tif/.tiff files")
        images = [read_tiff(f) for f in files]
        return images, pd.DataFrame({"Metadata_FileName": [f.name for f in files]})
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        images = load_array(path)
        n = len(images) if images.ndim else 0
        meta = {} if suffix == ".npy" else npz_columns(path, n)
        return images, with_metadata_prefix(pd.DataFrame(meta, index=range(n)))
    raise InputError(path, f"unsupported input type '{suffix}': expected .npy, .npz or a folder of TIFFs")
