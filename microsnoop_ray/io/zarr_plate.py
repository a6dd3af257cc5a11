"""OME-Zarr HCS plates (NGFF 0.4 on Zarr v2, NGFF 0.5 on Zarr v3): read and write.

A plate is ``plate.zarr/<row>/<column>/<field>/<level>``; the plate, well and image
metadata (``plate``, ``well``, ``multiscales``, ``omero``) live in ``.zattrs`` (0.4) or
under the ``ome`` key of ``zarr.json`` (0.5). Channel names come from the ``omero``
channel labels. Wells are reported as ``A01`` (row letter, zero-padded column).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import zarr

from ..errors import InputError


def well_name(row: str, column: str | int) -> str:
    """``("B", "3")`` -> ``"B03"``."""
    return f"{row}{int(column):02d}"


def split_well(well: str) -> tuple[str, int]:
    """``"B03"`` -> ``("B", 3)``; raises ValueError on anything else."""
    m = re.fullmatch(r"([A-Za-z]{1,2})0*(\d{1,3})", str(well).strip())
    if not m:
        raise ValueError(f"{well!r} is not a well name like A01")
    return m.group(1).upper(), int(m.group(2))


@dataclasses.dataclass(frozen=True)
class FieldRef:
    """One field of view of a plate: where it is and how to name it."""

    plate: str
    well: str
    site: int
    path: str  # path of the image group inside the plate, e.g. "A/1/0"

    @property
    def where(self) -> str:
        return f"plate {self.plate}, well {self.well}, site {self.site}"


def _ome_attrs(group) -> dict:
    attrs = dict(group.attrs)
    return dict(attrs["ome"]) if "ome" in attrs else attrs


class Plate:
    """A read-only OME-Zarr HCS plate.

    Parameters
    ----------
    path : str or Path
        The ``.zarr`` folder of the plate.
    name : str, optional
        The plate's name (``Metadata_Plate``); default: the ``name`` in the plate
        metadata, else the folder name without ``.zarr``.
    """

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        try:
            self.root = zarr.open_group(str(self.path), mode="r")
        except Exception as exc:
            raise InputError(self.path, f"not a readable Zarr group ({type(exc).__name__}: {exc})") from None
        attrs = _ome_attrs(self.root)
        if "plate" not in attrs:
            raise InputError(self.path, "no 'plate' metadata: not an OME-Zarr HCS plate")
        self.meta = attrs["plate"]
        self.version = str(attrs.get("version") or self.meta.get("version") or "0.4")
        self.name = name or self.meta.get("name") or self.path.name.removesuffix(".zarr")
        self.rows = [r["name"] for r in self.meta["rows"]]
        self.columns = [c["name"] for c in self.meta["columns"]]
        self._channels: list[str] | None = None

    def wells(self) -> list[tuple[str, str]]:
        """(well name like ``A01``, path like ``A/1``) of every well in the metadata."""
        out = []
        for w in self.meta["wells"]:
            if "rowIndex" in w and "columnIndex" in w:
                row, col = self.rows[w["rowIndex"]], self.columns[w["columnIndex"]]
            else:
                row, col = w["path"].split("/")
            out.append((well_name(row, col), w["path"]))
        return out

    def fields(self) -> Iterator[FieldRef]:
        """Every field of every well, in plate order (sites numbered from 1)."""
        for well, wpath in self.wells():
            try:
                images = _ome_attrs(self.root[wpath])["well"]["images"]
            except KeyError:
                raise InputError(f"plate {self.name}, well {well}", "well group or its 'well' metadata is missing") \
                    from None
            for i, img in enumerate(images):
                yield FieldRef(self.name, well, i + 1, f"{wpath}/{img['path']}")

    def channel_names(self, field: FieldRef | None = None) -> list[str]:
        """Channel labels from the ``omero`` metadata (``ch0``.. when a field has none)."""
        field = field or next(self.fields())
        attrs = _ome_attrs(self.root[field.path])
        chans = attrs.get("omero", {}).get("channels")
        _, arr, axes = self._array(field)
        n = arr.shape[axes.index("c")] if "c" in axes else 1
        if chans:
            names = [str(c.get("label") or f"ch{i}") for i, c in enumerate(chans)]
            if len(names) != n:
                raise InputError(field.where, f"omero lists {len(names)} channels but the array has {n}")
            return names
        return [f"ch{i}" for i in range(n)]

    def _array(self, field: FieldRef):
        try:
            group = self.root[field.path]
        except KeyError:
            raise InputError(field.where, f"image group {field.path} is missing") from None
        ms = _ome_attrs(group).get("multiscales")
        if not ms:
            raise InputError(field.where, "image has no 'multiscales' metadata")
        level = ms[0]["datasets"][0]["path"]
        axes = [a["name"] if isinstance(a, Mapping) else a for a in ms[0].get("axes", [])]
        try:
            arr = group[level]
        except KeyError:
            raise InputError(field.where, f"resolution level {level} is missing") from None
        if not axes:
            axes = ["t", "c", "z", "y", "x"][-arr.ndim:]
        if len(axes) != arr.ndim:
            raise InputError(field.where, f"axes {axes} do not match the array's {arr.ndim} dimensions")
        return group, arr, axes

    def read(self, field: FieldRef, allow_missing_chunks: bool = False) -> np.ndarray:
        """The field as (c, y, x) in its stored dtype (first time point, max projection over z).

        Zarr reads a chunk that is not stored as the fill value, silently, and writers skip chunks
        that equal the fill value (an empty channel). A (y, x) plane with *some* of its chunks
        stored and others missing is a lost file or an interrupted copy: that raises InputError,
        unless ``allow_missing_chunks``. A plane with no chunk at all is an empty channel.
        """
        _, arr, axes = self._array(field)
        partial = None if allow_missing_chunks else _planes_with_missing_chunks(arr, axes, field.where)
        if partial:
            n_missing, planes = partial
            raise InputError(field.where, f"{n_missing} Zarr chunk(s) missing in {planes} image plane(s) whose other "
                                          f"chunks are stored (they would read as the fill value "
                                          f"{np.asarray(arr.fill_value).item()})")
        try:
            data = np.asarray(arr[...])
        except Exception as exc:  # missing or corrupt chunk, codec errors
            raise InputError(field.where, f"pixel data unreadable ({type(exc).__name__}: {exc})") from None
        if "t" in axes:
            data = np.take(data, 0, axis=axes.index("t"))
            axes = [a for a in axes if a != "t"]
        if "z" in axes:
            data = data.max(axis=axes.index("z"))
            axes = [a for a in axes if a != "z"]
        if "c" not in axes:
            data = data[None]
            axes = ["c"] + axes
        order = [axes.index(a) for a in ("c", "y", "x")]
        return np.transpose(data, order)

    def read_labels(self, field: FieldRef, name: str) -> np.ndarray | None:
        """A label image ``<field>/labels/<name>`` as (y, x) int32, or None if absent."""
        try:
            group = self.root[f"{field.path}/labels/{name}"]
        except KeyError:
            return None
        level = _ome_attrs(group)["multiscales"][0]["datasets"][0]["path"]
        data = np.asarray(group[level][...])
        return data.reshape(data.shape[-2:]).astype(np.int32)


_METADATA_KEYS = {"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"}


def stored_chunk_keys(arr) -> list[str]:
    """The keys of the chunks (or shards) of ``arr`` that its store holds, relative to the array.

    Public zarr API only: the array's ``store`` and the store's ``list_prefix``. It runs on its own
    event loop in a helper thread, so it works inside Ray actors and notebooks that already run one.
    """
    import asyncio
    import concurrent.futures

    prefix = f"{arr.path}/" if arr.path else ""

    async def collect() -> list[str]:
        return [k[len(prefix):] async for k in arr.store.list_prefix(prefix)]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        keys = pool.submit(asyncio.run, collect()).result()
    return [k for k in keys if k.rsplit("/", 1)[-1] not in _METADATA_KEYS]


def _planes_with_missing_chunks(arr, axes: Sequence[str], where: str) -> tuple[int, int] | None:
    """(missing chunks, planes affected) over the (y, x) planes that are partly stored, or None when
    every plane is whole or empty. Raises InputError naming ``where`` when the store cannot be
    listed or holds keys this check cannot place: the check never switches itself off."""
    try:
        keys = stored_chunk_keys(arr)
    except Exception as exc:
        raise InputError(where, f"cannot check which Zarr chunks are stored ({type(exc).__name__}: {exc}); "
                                "a partly written plane would read as the fill value") from None
    grid = [int(np.ceil(n / c)) for n, c in zip(arr.shape, arr.shards or arr.chunks)]
    yx = [axes.index("y"), axes.index("x")]
    per_plane: dict[tuple, int] = {}
    for k in keys:
        # "0.1.0" (Zarr v2) or "c/0/1/0" (Zarr v3 default encoding), relative to the array
        key = k[2:] if k[:2] in ("c/", "c.") else k
        parts = key.replace("/", ".").split(".")
        if len(parts) != len(grid) or not all(p.isdigit() for p in parts):
            raise InputError(where, f"unexpected key {k!r} in the Zarr array (expected chunk keys of a "
                                    f"{len(grid)}-dimensional array): cannot check for missing chunks")
        idx = [int(p) for p in parts]
        plane = tuple(v for i, v in enumerate(idx) if i not in yx)
        per_plane[plane] = per_plane.get(plane, 0) + 1
    full = grid[yx[0]] * grid[yx[1]]
    partial = {p: n for p, n in per_plane.items() if n < full}
    return (sum(full - n for n in partial.values()), len(partial)) if partial else None


def open_plate(path: str | Path, name: str | None = None) -> Plate:
    """Open an OME-Zarr HCS plate (NGFF 0.4 or 0.5)."""
    return Plate(path, name)


def _write_attrs(group, attrs: dict, version: str) -> None:
    if version == "0.5":
        group.attrs["ome"] = {"version": "0.5", **attrs}
    else:
        group.attrs.update(attrs)


def _image_meta(channel_names: Sequence[str], version: str, name: str) -> dict:
    ms = {"axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
          "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}],
          "name": name}
    if version == "0.4":
        ms["version"] = "0.4"
    return {"multiscales": [ms],
            "omero": {"channels": [{"label": str(c), "active": True} for c in channel_names]}}


def write_plate(path: str | Path, fields: Mapping[tuple[str, int], np.ndarray], channel_names: Sequence[str],
                name: str | None = None, version: str = "0.4", labels: Mapping[tuple[str, int], np.ndarray] | None = None,
                chunk: int = 1024) -> Path:
    """Write an OME-Zarr HCS plate.

    Parameters
    ----------
    fields : mapping (well like "A01", site from 1) -> ndarray (c, y, x)
        Every field's pixels; sizes may differ between fields.
    channel_names : sequence of str
        The ``omero`` labels, in channel order.
    version : {"0.4", "0.5"}
        NGFF version: 0.4 writes Zarr v2, 0.5 writes Zarr v3.
    labels : mapping, optional
        Label images (y, x) per field, written as ``labels/cells``.
    """
    if version not in ("0.4", "0.5"):
        raise ValueError(f"NGFF version must be '0.4' or '0.5', got {version!r}")
    path = Path(path)
    name = name or path.name.removesuffix(".zarr")
    fmt = 2 if version == "0.4" else 3
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    wells = sorted({w for w, _ in fields}, key=lambda w: split_well(w))
    rows = sorted({split_well(w)[0] for w in wells}, key=lambda r: (len(r), r))
    cols = sorted({split_well(w)[1] for w in wells})
    plate_meta = {"name": name, "rows": [{"name": r} for r in rows], "columns": [{"name": str(c)} for c in cols],
                  "wells": [], "field_count": 0, "acquisitions": [{"id": 0}]}
    if version == "0.4":
        plate_meta["version"] = "0.4"
    for well in wells:
        r, c = split_well(well)
        wpath = f"{r}/{c}"
        plate_meta["wells"].append({"path": wpath, "rowIndex": rows.index(r), "columnIndex": cols.index(c)})
        sites = sorted(s for w, s in fields if w == well)
        plate_meta["field_count"] = max(plate_meta["field_count"], len(sites))
        wgroup = root.require_group(wpath)
        well_meta = {"images": [{"path": str(i), "acquisition": 0} for i in range(len(sites))]}
        if version == "0.4":
            well_meta["version"] = "0.4"
        _write_attrs(wgroup, {"well": well_meta}, version)
        for i, site in enumerate(sites):
            _write_field(wgroup.require_group(str(i)), np.asarray(fields[(well, site)]), channel_names, version,
                         chunk, f"{well}-{site}", None if labels is None else labels.get((well, site)))
    _write_attrs(root, {"plate": plate_meta}, version)
    return path


def _write_field(igroup, img: np.ndarray, channel_names: Sequence[str], version: str, chunk: int, name: str,
                 labels: np.ndarray | None) -> None:
    """One field's image group: its pixels (c, y, x), chunked by plane, and its label image as ``labels/cells``."""
    if img.ndim == 2:
        img = img[None]
    if img.shape[0] != len(channel_names):
        raise ValueError(f"{name.replace('-', ' site ', 1)}: {img.shape[0]} channels but {len(channel_names)} names")
    _write_attrs(igroup, _image_meta(channel_names, version, name), version)
    arr = igroup.create_array("0", shape=img.shape, dtype=img.dtype,
                              chunks=(1, min(chunk, img.shape[1]), min(chunk, img.shape[2])))
    arr[...] = img
    if labels is None:
        return
    lab = np.asarray(labels).astype(np.int32)
    lgroup = igroup.require_group("labels")
    _write_attrs(lgroup, {"labels": ["cells"]}, version)
    cgroup = lgroup.require_group("cells")
    meta = _image_meta(["cells"], version, "cells")
    meta["multiscales"][0]["axes"] = meta["multiscales"][0]["axes"][1:]
    meta["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] = [1.0, 1.0]
    del meta["omero"]
    meta["image-label"] = {"version": version} if version == "0.4" else {}
    _write_attrs(cgroup, meta, version)
    larr = cgroup.create_array("0", shape=lab.shape, dtype=np.int32, chunks=lab.shape)
    larr[...] = lab
