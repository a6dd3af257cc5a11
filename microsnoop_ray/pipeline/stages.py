"""The stages of the plate pipeline as plain callables (Ray Data wraps them in plate_job.py).

Data flow, one row per *work item* (a field of view, or a chunk of pre-cropped cells):

``read_item`` (task) -> ``CropStage`` (CPU actor: segment and crop; one row per one-channel
crop at its native size and dtype) -> ``EncodeStage`` (encoder actor: pad, normalise and
encode on its device; crop -> 256 features) ->
:class:`SiteCollector` on the driver, which writes every site as soon as all its planes
have arrived.

Every row carries the number of planes its site produces (``site_planes``) and how many of
them it stands for (``count``), so the collector knows when a site is complete; a site (or a
chunk of cells) that produces nothing sends one row of kind ``SKIP`` with the reason, and a
single unusable cell one row of kind ``DROP``, so every input is accounted for.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..model import EMBED_DIM, INPUT_SIZE

log = logging.getLogger(__name__)

PLANE, SKIP, DROP = 0, 1, 2  # a plane; a whole site skipped; one cell left out
CROP_COLUMNS = ("crop", "crop_h", "crop_w", "crop_dtype")
_OBJECT_COLUMNS = ["Metadata_ObjectNumber", "Metadata_Location_Center_X", "Metadata_Location_Center_Y",
                   "Metadata_Object_Area", "Metadata_Crop_Top", "Metadata_Crop_Bottom", "Metadata_Crop_Left",
                   "Metadata_Crop_Right"]


def site_key(plate: str, well: str, site: int) -> str:
    return f"{plate}|{well}|{int(site)}"


# --------------------------------------------------------------------------- read (tasks)

@functools.lru_cache(maxsize=2)
def _cell_array_cached(path: str, mtime: float) -> np.ndarray:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    return arr["images"] if isinstance(arr, np.lib.npyio.NpzFile) else arr


def cell_array(path: str) -> np.ndarray:
    """A cell array, opened once per worker process: ``.npy`` is memory-mapped, ``.npz`` loaded
    (use ``.npy`` for arrays larger than a worker's memory)."""
    return _cell_array_cached(str(path), Path(path).stat().st_mtime)


def read_item(item: dict) -> dict:
    """Read the pixels of one work item; errors become ``error`` text, never exceptions.

    Items of kind ``zarr`` (``path`` = plate folder, ``group`` = image group), ``files``
    (``files`` = JSON list of one path per channel) and ``cells`` (``path`` = cell array,
    ``rows`` = JSON list of row indices).
    """
    row = dict(item)
    row["error"] = ""
    where = f"plate {item['plate']}, well {item['well']}, site {item['site']}"
    try:
        if item["kind"] == "zarr":
            from ..io.zarr_plate import FieldRef, open_plate
            plate = open_plate(item["path"], name=item["plate"])
            ref = FieldRef(item["plate"], item["well"], int(item["site"]), item["group"])
            image = plate.read(ref)
            if item.get("labels"):
                lab = plate.read_labels(ref, item["labels"])
                row["labels"] = lab if lab is not None else np.zeros((0, 0), np.int32)
        elif item["kind"] == "files":
            from ..io.fields import read_field
            planes = [read_field(p) for p in json.loads(item["files"])]
            shapes = {p.shape[1:] for p in planes}
            if len(shapes) != 1:
                raise InputError(where, f"channel images differ in size: {sorted(shapes)}")
            image = np.concatenate(planes, axis=0)
        elif item["kind"] == "cells":
            rows = json.loads(item["rows"])
            image = np.ascontiguousarray(cell_array(item["path"])[rows])
        else:
            raise ValueError(f"unknown item kind {item['kind']!r}")
        if item.get("illum"):
            from ..io.illum import correct, load_functions
            image = correct(image, load_functions(json.loads(item["illum"])))
        n_channels = int(item["n_channels"])
        got = image.shape[0] if item["kind"] != "cells" else (image.shape[1] if image.ndim == 4 else 1)
        if got != n_channels:
            raise InputError(where, f"{got} channels, but the plate has {n_channels}")
        row["image"] = image
    except Exception as exc:  # reported per item; the job goes on
        msg = str(exc) if isinstance(exc, InputError) else f"{where}: {type(exc).__name__}: {exc}"
        row["error"] = msg
        row["image"] = np.zeros((0,), np.uint8)
    return row


# --------------------------------------------------------------------------- crop (CPU actors)

def _plane_rows(item: dict, objects: pd.DataFrame, crops: np.ndarray, site_planes: int | None = None,
                sites: np.ndarray | None = None, dtype=None) -> dict:
    """One output row per (object, channel) plane, the crop at its native size (compact hand-off).

    ``crops`` (m, c, h, w) may be cell-region windows zero-padded to 224 (fields): each is cut back
    to its window (``Metadata_Crop_*``), exactly what :func:`~microsnoop_ray.preprocess.pad_center`
    padded. Planes travel as raw bytes (``crop``, with ``crop_h``, ``crop_w``, ``crop_dtype``) in
    ``dtype`` (the source's, when it holds the values exactly); the encoder pads and normalises them.
    """
    m, c = crops.shape[:2]
    obj = objects.reset_index(drop=True)
    cols = {}
    for k in _OBJECT_COLUMNS:
        vals = obj[k].to_numpy(np.float64) if k in obj else np.full(m, np.nan)
        cols[k] = np.repeat(vals, c)
    dtype = np.dtype(dtype or crops.dtype)
    if dtype.kind in "ui" and crops.dtype != dtype:
        dtype = dtype if np.array_equal(crops, crops.astype(dtype)) else np.dtype(np.float32)
    padded = crops.shape[-2:] == (INPUT_SIZE, INPUT_SIZE) and "Metadata_Crop_Top" in obj
    data, hs, ws = [], [], []
    for i in range(m):
        crop = crops[i]
        if padded and np.isfinite(obj.loc[i, ["Metadata_Crop_Top", "Metadata_Crop_Bottom"]].to_numpy(float)).all():
            h = int(obj.at[i, "Metadata_Crop_Bottom"] - obj.at[i, "Metadata_Crop_Top"])
            w = int(obj.at[i, "Metadata_Crop_Right"] - obj.at[i, "Metadata_Crop_Left"])
            top, left = (INPUT_SIZE - h) // 2, (INPUT_SIZE - w) // 2
            crop = crop[:, top:top + h, left:left + w]
        crop = np.ascontiguousarray(crop, dtype=dtype)
        for ch in range(c):
            data.append(crop[ch].tobytes())
            hs.append(crop.shape[-2])
            ws.append(crop.shape[-1])
    n = m * c
    if sites is None:
        sites = np.full(m, int(item["site"]))
    return {
        "plate": np.full(n, item["plate"], dtype=object), "well": np.full(n, item["well"], dtype=object),
        "site": np.repeat(np.asarray(sites, np.int64), c), "channel": np.tile(np.arange(c, dtype=np.int64), m),
        "kind": np.full(n, PLANE, np.int64),
        "site_planes": np.repeat(site_planes, c) if isinstance(site_planes, np.ndarray)
        else np.full(n, n if site_planes is None else site_planes, np.int64),
        "reason": np.full(n, "", dtype=object), "count": np.ones(n, np.int64), **cols,
        "crop": np.array(data, dtype=object), "crop_h": np.array(hs, np.int64), "crop_w": np.array(ws, np.int64),
        "crop_dtype": np.full(n, dtype.str, dtype=object),
    }


def crops_of(batch: dict) -> list[np.ndarray]:
    """The (h, w) crops of a batch's rows, from their bytes (zero-copy views)."""
    return [np.frombuffer(b, dtype=np.dtype(d)).reshape(int(h), int(w))
            for b, d, h, w in zip(batch["crop"], batch["crop_dtype"], batch["crop_h"], batch["crop_w"])]


def _skip_row(item: dict, reason: str, kind: int = SKIP, count: int = 1, site_planes: int = 1,
              object_number: float = np.nan) -> dict:
    row = {"plate": np.array([item["plate"]], object), "well": np.array([item["well"]], object),
           "site": np.array([int(item["site"])]), "channel": np.array([0]), "kind": np.array([kind]),
           "site_planes": np.array([site_planes]), "reason": np.array([reason], object), "count": np.array([count])}
    for k in _OBJECT_COLUMNS:
        row[k] = np.array([np.nan])
    row["Metadata_ObjectNumber"] = np.array([float(object_number)])
    row.update(crop=np.array([b""], dtype=object), crop_h=np.array([0]), crop_w=np.array([0]),
               crop_dtype=np.array(["<f4"], dtype=object))
    return row


def _chunk_skip(item: dict, reason: str) -> dict:
    """A SKIP row that stands for every plane of a chunk of cells (its site cannot complete otherwise)."""
    meta = pd.DataFrame(json.loads(item["cells_meta"]))
    return _skip_row(item, reason, count=len(meta) * int(item["n_channels"]),
                     site_planes=int(meta["site_planes"].iloc[0]),
                     object_number=float(meta["Metadata_ObjectNumber"].min()))


def _concat(rows: list[dict]) -> dict:
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


class CropStage:
    """Segmentation and cropping of fields; every (object, channel) crop leaves at its native size and
    dtype (the encoder pads and normalises it).

    Holds the segmenter (e.g. the Cellpose network, on a GPU share when ``gpu``) once per actor.

    Parameters
    ----------
    options : dict
        ``mode``, ``segmenter``, ``cellpose_model``, ``diameter``, ``nuclei_channel``,
        ``rescale_constant``, ``border``, ``tile_overlap``, ``max_cells_per_site``, ``seed``, ``gpu``.
    """

    def __init__(self, options: dict):
        self.o = dict(options)
        self._segment = None

    def segmenter(self):
        if self._segment is None:
            from ..segment import make_segmenter
            self._segment, _ = make_segmenter(self.o.get("segmenter", "auto"), self.o.get("cellpose_model"),
                                              float(self.o.get("diameter", 30.0)), gpu=bool(self.o.get("gpu")))
        return self._segment

    def _subsample(self, n: int, key: str) -> np.ndarray:
        cap = self.o.get("max_cells_per_site")
        if not cap or n <= cap:
            return np.arange(n)
        rng = np.random.default_rng([int(self.o.get("seed", 0))] + [ord(ch) for ch in key])
        return np.sort(rng.choice(n, size=int(cap), replace=False))

    def process(self, item: dict) -> dict:
        """One work item (with its ``image``) -> plane rows."""
        if item.get("error"):
            return _chunk_skip(item, item["error"]) if item["kind"] == "cells" else _skip_row(item, item["error"])
        image = item["image"]
        if item["kind"] == "cells":
            return self._cells(item, image)
        from ..fields import prepare_field
        where = f"plate {item['plate']}, well {item['well']}, site {item['site']}"
        mode = self.o.get("mode", "cells")
        labels = item.get("labels")
        if self._needs_segmentation(item):
            if image.dtype.kind in "uif" and np.isfinite(image).all() and image.max() > image.min():
                labels = self.segmenter()([np.asarray(image[int(item["nuclei_channel"])], np.float32)])[0]
            else:
                labels = np.zeros(image.shape[1:], np.int32)
        prep = prepare_field(image, mode, labels=labels, rescale_constant=float(self.o.get("rescale_constant", 2.5)),
                             border=self.o.get("border", "drop"), tile_overlap=float(self.o.get("tile_overlap", 0.1)),
                             where=where)
        if prep.skip_reason is not None:
            return _skip_row(item, prep.skip_reason)
        objects = prep.objects
        if "Metadata_ObjectNumber" not in objects:
            objects = objects.assign(Metadata_ObjectNumber=np.arange(1, len(prep.crops) + 1))
        keep = self._subsample(len(prep.crops), site_key(item["plate"], item["well"], item["site"]))
        return _plane_rows(item, objects.iloc[keep], prep.crops[keep], dtype=image.dtype)

    def _cells(self, item: dict, cells: np.ndarray) -> dict:
        meta = pd.DataFrame(json.loads(item["cells_meta"]))
        if cells.ndim == 3:
            cells = cells[:, None]
        where = f"plate {item['plate']}, well {item['well']}, site {item['site']}"
        if cells.shape[-1] > INPUT_SIZE or cells.shape[-2] > INPUT_SIZE:
            return _chunk_skip(item, f"{where}: cells of {cells.shape[-2]}x{cells.shape[-1]} are larger than "
                                     f"{INPUT_SIZE}")
        if cells.dtype.kind not in "uif":
            return _chunk_skip(item, f"{where}: pixel type {cells.dtype} is not numeric")
        bad = ~np.isfinite(cells.reshape(len(cells), -1)).all(axis=1)
        rows = [_skip_row(item, f"{where}: cell {int(m.Metadata_ObjectNumber)} has NaN or infinite pixels", DROP,
                          count=cells.shape[1], site_planes=int(m.site_planes), object_number=m.Metadata_ObjectNumber)
                for m in meta[bad].itertuples(index=False)]
        good = ~bad
        meta = meta[good].reset_index(drop=True)
        cells = cells[good]
        if len(cells):
            rows.append(_plane_rows(item, meta, cells, site_planes=meta["site_planes"].to_numpy(np.int64),
                                    sites=meta["Metadata_Site"].to_numpy()))
            rows[-1]["well"] = np.repeat(meta["Metadata_Well"].to_numpy(object), cells.shape[1])
        return _concat(rows)

    def _needs_segmentation(self, item: dict) -> bool:
        labels = item.get("labels")
        return (not item.get("error") and item["kind"] != "cells" and self.o.get("mode", "cells") == "cells"
                and (labels is None or getattr(labels, "size", 0) == 0))

    def __call__(self, batch: dict) -> dict:
        """Several fields at once: their nuclei channels go through the segmenter in one call (Cellpose
        batches fields of equal size through the network together, on the GPU when it has one)."""
        items = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["plate"]))]
        todo = [it for it in items if self._needs_segmentation(it) and it["image"].dtype.kind in "uif"
                and np.isfinite(it["image"]).all() and it["image"].max() > it["image"].min()]
        if len(todo) > 1:
            masks = self.segmenter()([np.asarray(it["image"][int(it["nuclei_channel"])], np.float32) for it in todo])
            for it, lab in zip(todo, masks):
                it["labels"] = lab
        return _concat([self.process(it) for it in items])


# --------------------------------------------------------------------------- encode (actor pool)

class EncodeStage:
    """Pads, normalises and encodes the crops on the encoder's device; the model is loaded once per actor.

    Parameters
    ----------
    weights : str or None
        Checkpoint path (None: the shipped default weights).
    device : {"auto", "cpu", "cuda"}
    threads : int, optional
        Torch threads (default: the CPUs of this node).
    compile : bool
        ``torch.compile`` the encoder (worth it for long runs; see benchmarks/encoder.py).
    normalization : {"default", "faithful"}
        The percentile normalisation's degenerate-case rule (``preprocess.normalize_percentile``).
    precision : {"fp32", "tf32", "bf16", "fp16"}
        See :class:`~microsnoop_ray.encode.Encoder`.
    """

    def __init__(self, weights: str | None = None, device: str = "auto", threads: int | None = None,
                 compile: bool = False, normalization: str = "default", precision: str = "fp32"):
        import torch

        from ..encode import Encoder
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(int(threads or len(os.sched_getaffinity(0))))
        self.encoder = Encoder(weights, device=device, compile=compile, precision=precision)
        self.normalization = normalization

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        n = len(batch["kind"])
        feats = np.zeros((n, EMBED_DIM), np.float32)
        real = batch["kind"] == PLANE
        if real.any():
            feats[real] = self.encoder.embed_crops(crops_of({k: batch[k][real] for k in CROP_COLUMNS}),
                                                   self.normalization)
        for k in CROP_COLUMNS:
            batch.pop(k)
        batch["features"] = feats
        # the actor's busy time, spread over the rows (the driver sums it: encoder utilisation)
        batch["encode_seconds"] = np.full(n, (time.perf_counter() - t0) / max(1, n))
        return batch


# --------------------------------------------------------------------------- collect + write (driver)

class SiteCollector:
    """Gathers encoded planes per site and writes each site once it is complete.

    Parameters
    ----------
    write_site : callable(plate, well, site, cells DataFrame, dropped list of dict) -> None
    write_skip : callable(plate, well, site, reason) -> None
    channels : dict plate -> list of channel names
    """

    def __init__(self, write_site, write_skip, channels: dict[str, list[str]]):
        self.write_site, self.write_skip, self.channels = write_site, write_skip, channels
        self.pending: dict[str, list[dict]] = {}
        self.received: dict[str, int] = {}
        self.seen: dict[str, set] = {}
        self.done: set[str] = set()
        self.sites_done = 0
        self.duplicates = 0
        self.encode_seconds = 0.0

    @staticmethod
    def _row_ids(part: dict) -> list[tuple]:
        obj = np.nan_to_num(np.asarray(part["Metadata_ObjectNumber"], np.float64), nan=-1.0)
        return list(zip(np.asarray(part["kind"]).tolist(), obj.tolist(), np.asarray(part["channel"]).tolist()))

    def add(self, batch: dict) -> None:
        """Take encoded rows of any sites. A row that arrives twice (a task retried after a worker or
        node died) is counted once; rows of a site already written are ignored."""
        if "encode_seconds" in batch:
            self.encode_seconds += float(np.sum(batch["encode_seconds"]))
        keys = [site_key(p, w, s) for p, w, s in zip(batch["plate"], batch["well"], batch["site"])]
        order = pd.Series(range(len(keys)), index=keys)
        for key, idx in order.groupby(level=0):
            part = {k: np.asarray(v)[idx.to_numpy()] for k, v in batch.items()}
            if key in self.done:
                self.duplicates += len(idx)
                continue
            seen = self.seen.setdefault(key, set())
            ids = self._row_ids(part)
            fresh = np.array([i not in seen for i in ids]) & ~pd.Series(ids).duplicated().to_numpy()
            if not fresh.all():
                self.duplicates += int((~fresh).sum())
                part = {k: v[fresh] for k, v in part.items()}
                ids = [i for i, f in zip(ids, fresh) if f]
                if not ids:
                    continue
            seen.update(ids)
            self.pending.setdefault(key, []).append(part)
            self.received[key] = self.received.get(key, 0) + int(part["count"].sum())
            if self.received[key] >= int(part["site_planes"][0]):
                self._finish(key)

    def _finish(self, key: str) -> None:
        parts = self.pending.pop(key)
        self.received.pop(key)
        self.seen.pop(key, None)
        self.done.add(key)
        rows = _concat(parts)
        plate, well, site = key.split("|")
        site = int(site)
        if (rows["kind"] == SKIP).any():
            self.write_skip(plate, well, site, str(rows["reason"][rows["kind"] == SKIP][0]))
            self.sites_done += 1
            return
        drop = rows["kind"] == DROP
        dropped = [{"Metadata_ObjectNumber": int(o), "reason": str(r)}
                   for o, r in zip(rows["Metadata_ObjectNumber"][drop], rows["reason"][drop])]
        kept = {k: v[~drop] for k, v in rows.items()}
        if len(kept["kind"]) == 0:
            self.write_skip(plate, well, site, f"every cell was left out ({dropped[0]['reason']})")
        else:
            self.write_site(plate, well, site, assemble_cells(kept, self.channels[plate]), dropped)
        self.sites_done += 1

    def incomplete(self) -> list[str]:
        return sorted(self.pending)


def assemble_cells(rows: dict, channels: list[str]) -> pd.DataFrame:
    """Plane rows of one site -> one row per object with its channels' features side by side."""
    from ..encode import feature_names
    c = len(channels)
    order = np.lexsort((rows["channel"], rows["Metadata_ObjectNumber"]))
    feats = rows["features"][order].reshape(-1, c * EMBED_DIM)
    first = order[::c]
    meta = pd.DataFrame({k: rows[k][first] for k in _OBJECT_COLUMNS})
    meta["Metadata_ObjectNumber"] = meta["Metadata_ObjectNumber"].astype(np.int64)
    for k in ("Metadata_Crop_Top", "Metadata_Crop_Bottom", "Metadata_Crop_Left", "Metadata_Crop_Right",
              "Metadata_Object_Area"):
        if meta[k].isna().all():
            meta = meta.drop(columns=k)
        elif k != "Metadata_Object_Area" or not meta[k].isna().any():
            meta[k] = meta[k].astype(np.int64)
    return pd.concat([meta.reset_index(drop=True), pd.DataFrame(feats, columns=feature_names(channels))], axis=1)
