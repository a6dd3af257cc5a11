"""The stages every command shares, as plain callables: read -> segment/crop -> encode -> collect.

They run in-process (:func:`~microsnoop_ray.pipeline.executors.run_in_process`: ``fields``,
notebooks, unit tests) and on Ray Data (:func:`~microsnoop_ray.pipeline.executors.ray_dataset`:
``profile`` and ``jobs/``) unchanged. Rows between them, one per *work item* and then one per plane:

``read_row`` (task)      ``{"item": WorkItem, "image": ndarray, "error": str}``
``CropStage`` (actor)    one row per (object, channel) plane: the crop at its native size and dtype
                         (:data:`CROP_COLUMNS`), its site (``plate``, ``well``, ``site``), ``kind``
                         (:data:`PLANE`), ``Metadata_ObjectNumber`` and window columns; with
                         ``cellprofiler`` features, the cell's CellProfiler measurements (``cp``,
                         float64 bytes) on its channel-0 row, measured here on the cell's own object
``EncodeStage`` (actor)  pads, normalises and encodes on its device: ``features`` (n, 256); given a
                         ``sink``, it also writes every site whose planes all came in one call, where
                         they were encoded, and hands on a single :data:`DONE` row for it
:class:`SiteCollector`   on the driver: counts the DONE rows, and writes the sites whose planes came
                         in several calls (a site split into cell chunks) once all have arrived

Every row carries the number of planes its site produces (``site_planes``) and how many of them
it stands for (``count``), so the collector knows when a site is complete. A site (or a chunk of
cells) that yields nothing sends one row of kind :data:`SKIP` with the reason, and an unusable
cell one row of kind :data:`DROP`: every input is accounted for. Only input problems
(:class:`~microsnoop_ray.errors.InputError`) become such rows; any other exception is a bug and
fails the job with its traceback.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

import numpy as np
import pandas as pd

from ..errors import InputError
from ..crop.field import field_problem, prepare_field
from ..io.sources import SiteKey, WorkItem
from ..model import EMBED_DIM, INPUT_SIZE
from .config import CropConfig, EncodeConfig, SegmentationConfig

log = logging.getLogger(__name__)

#: Row kinds: a crop to encode; a whole site skipped (``reason``); one cell left out (``reason``); a site
#: written by the encoder actor (``cells`` of them; ``reason`` the skip reason when it had none), standing
#: for all its planes.
PLANE, SKIP, DROP, DONE = "plane", "skip", "drop", "done"
CROP_COLUMNS = ("crop", "crop_h", "crop_w", "crop_dtype")
#: Where the time goes: the seconds of each step, per item on its first row (column ``step_seconds``,
#: (n, len(STEPS)) float64); the collector sums them per site.
STEPS = ("read", "nuclei_segmentation", "cell_segmentation", "crop", "cellprofiler", "encoder")
#: Per-object columns. ``Metadata_ObjectNumber`` is 0 on site rows (0 is the background of a label image).
#: ``Metadata_Cells_ObjectNumber``: with ``cell_channel``, the number of the object's cell in the cell
#: segmentation (the object's own number is its nucleus's).
OBJECT_COLUMNS = ("Metadata_Location_Center_X", "Metadata_Location_Center_Y", "Metadata_Object_Area",
                  "Metadata_Crop_Top", "Metadata_Crop_Bottom", "Metadata_Crop_Left", "Metadata_Crop_Right",
                  "Metadata_Cells_ObjectNumber")


#: The columns of the crop stage's rows and their dtypes (numpy kinds: ``O`` object, ``i`` int64, ``f``
#: float64), one row per (object, channel) plane, or per SKIP/DROP note. ``step_seconds`` is (n, len(STEPS)).
CROP_ROW_SCHEMA = {"plate": "O", "well": "O", "site": "i", "kind": "O", "reason": "O", "count": "i",
                   "site_planes": "i", "channel": "i", "Metadata_ObjectNumber": "i",
                   **{k: "f" for k in OBJECT_COLUMNS}, "objects_rejected": "i", "objects_found": "i",
                   "crop": "O", "crop_h": "i", "crop_w": "i", "crop_dtype": "O", "cp": "O", "cp_objects": "O",
                   "step_seconds": "f"}
#: The encoder stage's rows: the crop rows without the crops, with the embedding (``features``, (n, 256)
#: float32), the encoder's busy seconds and arithmetic, and (DONE rows) the cells a site wrote.
ENCODE_ROW_SCHEMA = {**{k: v for k, v in CROP_ROW_SCHEMA.items() if k not in CROP_COLUMNS}, "features": "f",
                     "encode_seconds": "f", "arithmetic": "O", "cells": "i"}


def check_rows(rows: dict, schema: dict) -> None:
    """Raise TypeError unless ``rows`` has exactly the columns of ``schema``, of its dtype kinds and one length
    (a stage that hands on other rows is a bug)."""
    if set(rows) != set(schema):
        raise TypeError(f"row columns differ from the schema: extra {sorted(set(rows) - set(schema))}, "
                        f"missing {sorted(set(schema) - set(rows))}")
    bad = [k for k, kind in schema.items() if np.asarray(rows[k]).dtype.kind != kind]
    if bad or len({len(v) for v in rows.values()}) != 1:
        raise TypeError(f"columns of the wrong dtype {bad} or of different lengths")


def _message(item: WorkItem, exc: InputError) -> str:
    """The error text, with the item's plate/well/site in front when the error names only a file."""
    text = str(exc)
    return text if text.startswith(item.where) else f"{item.where}: {text}"


# --------------------------------------------------------------------------- read (tasks)

def read_row(row: dict) -> dict:
    """Read the pixels of ``row["item"]``. An :class:`InputError` becomes the row's ``error`` text
    (naming plate, well, site and file); anything else propagates."""
    item: WorkItem = row["item"]
    t0 = time.perf_counter()
    try:
        image, error = item.load(), ""
    except InputError as exc:
        image, error = np.zeros((0,), np.uint8), _message(item, exc)
    return {"item": item, "image": image, "error": error, "read_seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- crop (CPU actors)

def _placeholder_channels(n: int) -> tuple[str, ...]:
    """Channel names for measuring: the columns' order depends on the channels' positions only; the
    collector names them with the plate's real channel names."""
    return tuple(f"ch{i}" for i in range(n))


def _rows(item: WorkItem, n: int, kind: str, reason: str = "", count=1, site_planes=None) -> dict:
    """The columns every row has, for ``n`` rows of one item."""
    if site_planes is None:
        site_planes = item.site_planes if item.precropped else n
    return {"plate": np.full(n, item.plate, dtype=object), "well": np.full(n, item.well, dtype=object),
            "site": np.full(n, int(item.site), np.int64), "kind": np.full(n, kind, dtype=object),
            "reason": np.full(n, reason, dtype=object), "count": np.full(n, int(count), np.int64),
            "site_planes": np.full(n, int(site_planes), np.int64)}


def _note_row(item: WorkItem, reason: str, kind: str = SKIP, count: int = 1, site_planes: int = 1,
              object_number: int = 0) -> dict:
    """A SKIP row (the site, or a chunk of its cells) or a DROP row (one cell), with no crop."""
    row = _rows(item, 1, kind, reason, count, site_planes)
    row.update({"channel": np.zeros(1, np.int64), "Metadata_ObjectNumber": np.array([int(object_number)]),
                **{k: np.full(1, np.nan) for k in OBJECT_COLUMNS}, "objects_rejected": np.zeros(1, np.int64),
                "objects_found": np.zeros(1, np.int64),
                "crop": np.array([b""], dtype=object), "crop_h": np.zeros(1, np.int64),
                "crop_w": np.zeros(1, np.int64), "crop_dtype": np.array(["<f4"], dtype=object),
                "cp": np.array([b""], dtype=object), "cp_objects": np.array([""], dtype=object)})
    return row


def skip_rows(item: WorkItem, reason: str) -> dict:
    """One SKIP row that stands for every plane of the item (a cell chunk: of its cells)."""
    if item.precropped:
        return _note_row(item, reason, count=len(item.rows) * item.n_channels, site_planes=item.site_planes,
                         object_number=min(item.object_numbers))
    return _note_row(item, reason)


def plane_rows(item: WorkItem, objects: pd.DataFrame, crops: np.ndarray, rejected: int = 0, dtype=None,
               measurements: np.ndarray | None = None, site_planes: int | None = None,
               compartment: str = "Cells", found: int | None = None) -> dict:
    """One row per (object, channel) plane, the crop at its native size (compact hand-off).

    ``crops`` (m, c, h, w) may be cell-region windows zero-padded to 224 (fields): each is cut back
    to its window (``Metadata_Crop_*``), exactly what :func:`~microsnoop_ray.model.preprocess.pad_center`
    padded. Planes travel as raw bytes in ``dtype`` (the source's, when it holds the values exactly).
    ``measurements`` (m, D) float64, the objects' CellProfiler measurements, travel on their
    channel-0 rows (column ``cp``), with the compartments they cover (``cp_objects``, e.g.
    ``Nuclei,Cells,Cytoplasm``). ``found``: the objects the item gave before any subsample (default
    ``m``; a site's count against CellProfiler's). ``site_planes``: the site's planes when some of its cells
    leave as DROP rows (default: these rows, or the cell chunk's site).
    """
    m, c = crops.shape[:2]
    obj = objects.reset_index(drop=True)
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
    row = _rows(item, n, PLANE, site_planes=site_planes)
    row.update({"channel": np.tile(np.arange(c, dtype=np.int64), m),
                "Metadata_ObjectNumber": np.repeat(obj["Metadata_ObjectNumber"].to_numpy(np.int64), c),
                **{k: np.repeat(obj[k].to_numpy(np.float64) if k in obj else np.full(m, np.nan), c)
                   for k in OBJECT_COLUMNS},
                "objects_rejected": np.full(n, int(rejected), np.int64),
                "objects_found": np.full(n, int(found if found is not None else m), np.int64),
                "crop": np.array(data, dtype=object), "crop_h": np.array(hs, np.int64),
                "crop_w": np.array(ws, np.int64), "crop_dtype": np.full(n, dtype.str, dtype=object)})
    cp = np.full(n, b"", dtype=object)
    if measurements is not None:
        cp[::c] = [np.ascontiguousarray(v, np.float64).tobytes() for v in measurements]
    row["cp"] = cp
    row["cp_objects"] = np.full(n, compartment, dtype=object)
    return row


def crops_of(batch: dict) -> list[np.ndarray]:
    """The (h, w) crops of a batch's rows, from their bytes (zero-copy views)."""
    return [np.frombuffer(b, dtype=np.dtype(d)).reshape(int(h), int(w))
            for b, d, h, w in zip(batch["crop"], batch["crop_dtype"], batch["crop_h"], batch["crop_w"])]


def concat_rows(rows: list[dict]) -> dict:
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def needs_segmentation(mode: str, item: WorkItem) -> bool:
    """Whether the crop stage segments ``item``: a field in cells mode without supplied labels or centres."""
    return mode == "cells" and not item.precropped and item.supplied_objects is None


class CropStage:
    """Segmentation and cropping of fields; every (object, channel) crop leaves at its native size and
    dtype (the encoder pads and normalises it). Holds the segmenter (e.g. the Cellpose network, on a
    GPU share when ``gpu``) once per actor.

    Parameters
    ----------
    segmentation : SegmentationConfig
    crop : CropConfig
    gpu : bool
        Run Cellpose on this actor's GPU share.
    on_field : callable(item, image, labels, prepared), optional
        ``prepared`` is the field's :class:`~microsnoop_ray.crop.field.PreparedField`;
        called in-process for every cropped field (QC pictures of ``fields --png``).
    segmenter : callable, optional
        A segmenter already made (:func:`~microsnoop_ray.segment.make_segmenter`); by default the
        first field that needs one makes it.
    features : tuple of str
        With ``cellprofiler``, every kept cell is measured by cp-measure on its own object (the
        site's label image; for cells without one, the object nearest the crop centre); a cell it
        cannot measure becomes a :data:`DROP` row with the reason. Items with a ``cell_channel``
        have cells segmented besides their nuclei, matched to them
        (:func:`~microsnoop_ray.segment.match.match_cells`), and measured in three compartments.
    """

    def __init__(self, segmentation: SegmentationConfig = SegmentationConfig(), crop: CropConfig = CropConfig(),
                 gpu: bool = False, on_field: Callable | None = None, segmenter: Callable | None = None,
                 features: tuple[str, ...] = ("microsnoop",)):
        self.seg, self.crop, self.gpu, self.on_field = segmentation, crop, gpu, on_field
        self._segment = segmenter
        self.measure = "cellprofiler" in features
        self.seconds = dict.fromkeys(STEPS, 0.0)  # the item in hand's (:meth:`process`)
        if self.measure:
            from ..features.cellprofiler import require_cp_measure
            require_cp_measure()

    def segmenter(self):
        if self._segment is None:
            from ..segment import make_segmenter
            self._segment, _ = make_segmenter(self.seg.segmenter, self.seg.cellpose_model, self.seg.diameter,
                                              gpu=self.gpu)
        return self._segment

    def _subsample(self, n: int, key: SiteKey) -> np.ndarray:
        cap = self.crop.max_cells_per_site
        if not cap or n <= cap:
            return np.arange(n)
        # seeded by the site's name, so a site draws the same cells whatever else the run holds
        name = f"{key.plate}|{key.well}|{key.site}"
        rng = np.random.default_rng([int(self.crop.seed)] + [ord(ch) for ch in name])
        return np.sort(rng.choice(n, size=int(cap), replace=False))

    def needs_segmentation(self, item: WorkItem) -> bool:
        return needs_segmentation(self.crop.mode, item)

    def segment(self, items: list[WorkItem], images: list[np.ndarray]) -> list[tuple]:
        """``(nuclei, cells or None, seconds)`` of fields, the segmenter called once per kind for all
        (``seconds``: each field's share of the two calls, by step).

        Nuclei are segmented on each item's nuclei channel; items with a ``cell_channel`` also get
        cells (Cellpose on the cell channel with the nuclei channel, at the cell diameter). A field
        that cannot be segmented (:func:`~microsnoop_ray.crop.field.field_problem`) gets empty labels.
        """
        from ..segment import CellposeSegmenter

        ok = [i for i, im in enumerate(images) if field_problem(im) is None]
        nuclei_planes = [np.asarray(images[i][items[i].nuclei_channel], np.float32) for i in ok]
        t0 = time.perf_counter()
        nuclei = dict(zip(ok, self.segmenter()(nuclei_planes) if ok else []))
        t1 = time.perf_counter()
        with_cells = [j for j, i in enumerate(ok) if items[i].cell_channel is not None]
        cells: dict[int, np.ndarray] = {}
        if with_cells:
            if not isinstance(self.segmenter(), CellposeSegmenter):
                raise ValueError("cells are segmented by Cellpose: --cell-channel needs --segmenter cellpose and "
                                 "--cellpose-model FILE (a two-channel cytoplasm model)")
            cyto = [np.asarray(images[ok[j]][items[ok[j]].cell_channel], np.float32) for j in with_cells]
            found = self.segmenter()([nuclei_planes[j] for j in with_cells], cyto=cyto,
                                     diameter=self.seg.cell_diameter or 2 * self.seg.diameter)
            cells = {ok[j]: lab for j, lab in zip(with_cells, found)}
        share = {"nuclei_segmentation": (t1 - t0) / max(1, len(ok)),
                 "cell_segmentation": (time.perf_counter() - t1) / max(1, len(with_cells))}
        return [(nuclei.get(i, np.zeros(im.shape[1:], np.int32)), cells.get(i),
                 {k: v for k, v in share.items() if k == "nuclei_segmentation" or i in cells})
                for i, im in enumerate(images)]

    def _supplied(self, item: WorkItem, image: np.ndarray) -> tuple[np.ndarray | None, pd.DataFrame | None]:
        """The item's own objects: a label image, or crop windows around supplied centres. Raises InputError."""
        from ..crop.windows import bboxes_from_centres

        if self.crop.mode != "cells":
            return None, None
        labels = item.labels()
        if labels is not None and labels.shape != image.shape[1:]:
            raise InputError(item.where, f"label image {labels.shape} does not match the field {image.shape[1:]}")
        if labels is None and item.supplied_objects == "centres":
            x, y, lab = item.object_centres()
            return None, bboxes_from_centres(x, y, item.object_size or self.seg.diameter, image.shape[1:], lab)
        return labels, None

    def process(self, row: dict, segmented: tuple | None = None) -> dict:
        """One read row (``item``, ``image``, ``error``) -> plane rows (``segmented``: its
        :meth:`segment` result, when segmented already), the item's seconds per step on the first."""
        self.seconds = dict.fromkeys(STEPS, 0.0)
        self.seconds["read"] = float(row.get("read_seconds", 0.0))
        out = self._process(row, segmented)
        steps = np.zeros((len(out["kind"]), len(STEPS)))
        steps[0] = [self.seconds[k] for k in STEPS]
        out["step_seconds"] = steps
        return out

    def _process(self, row: dict, segmented: tuple | None) -> dict:
        item: WorkItem = row["item"]
        if row["error"]:
            return skip_rows(item, row["error"])
        image = row["image"]
        if item.precropped:
            return self._cells(item, image)
        try:
            labels, bboxes = self._supplied(item, image)
        except InputError as exc:
            return skip_rows(item, _message(item, exc))
        cells = None
        if labels is None and bboxes is None and self.needs_segmentation(item):
            labels, cells, seconds = segmented if segmented is not None else self.segment([item], [image])[0]
            self.seconds.update(seconds)
        t0 = time.perf_counter()
        prep = prepare_field(image, self.crop.mode, labels=labels, bboxes=bboxes,
                             rescale_constant=self.crop.rescale_constant, border=self.crop.border,
                             tile_overlap=self.crop.tile_overlap, where=item.where)
        if self.on_field is not None:
            self.on_field(item, image, labels, prep)
        if prep.skip_reason is not None:
            return skip_rows(item, prep.skip_reason)
        objects = prep.objects
        if "Metadata_ObjectNumber" not in objects:
            objects = objects.assign(Metadata_ObjectNumber=np.arange(1, len(prep.crops) + 1))
        keep = self._subsample(len(prep.crops), item.key)
        objects, crops = objects.iloc[keep].reset_index(drop=True), prep.crops[keep]
        self.seconds["crop"] += time.perf_counter() - t0
        # the one object measured is named for what it is: segmented on the nuclei channel, or nucleus
        # centres, it is the nucleus; a supplied label image may hold anything, and stays "Cells"
        site = _Site(item, objects, crops, len(prep.rejected), image.dtype,
                     "Cells" if item.supplied_objects == "labels" else "Nuclei", found=len(prep.crops))
        if cells is not None:
            return self._with_cells(site, image, labels, cells)
        if not self.measure:
            return site.rows()
        return site.rows(*self._measure_nuclei(item, image, labels, objects))

    def _measure_nuclei(self, item: WorkItem, image: np.ndarray, labels: np.ndarray | None,
                        objects: pd.DataFrame) -> tuple[np.ndarray, dict[int, str]]:
        """CellProfiler measurements of one object per crop: its label, or (supplied centres) the
        object nearest the window's centre."""
        from ..features.cellprofiler import measure_crops, measure_windows

        t0 = time.perf_counter()
        names = _placeholder_channels(image.shape[0])
        if labels is not None:
            values, failed = measure_windows(image, labels, objects, names)
        else:
            windows = [image[:, t:b, l:r] for t, b, l, r in objects[["Metadata_Crop_Top", "Metadata_Crop_Bottom",
                       "Metadata_Crop_Left", "Metadata_Crop_Right"]].to_numpy(np.int64)]
            values = np.stack([measure_crops(w[None], names)[0][0] for w in windows])
            failed = {int(o): "CellProfiler measurements: its object could not be measured"
                      for o, v in zip(objects["Metadata_ObjectNumber"], values) if np.isnan(v).all()}
        self.seconds["cellprofiler"] += time.perf_counter() - t0
        return values, failed

    def _with_cells(self, site: "_Site", image: np.ndarray, nuclei: np.ndarray, cells: np.ndarray) -> dict:
        """Rows of a field with nuclei and cells: nuclei without a cell are dropped with the reason, cells
        without a nucleus counted; with ``cellprofiler``, Nuclei, Cells and Cytoplasm are measured."""
        from ..segment.match import match_cells

        matched = match_cells(nuclei, cells)
        numbers = site.objects["Metadata_ObjectNumber"].to_numpy(np.int64)
        failed = {int(o): matched.nuclei_without_cell[int(o)] for o in numbers
                  if int(o) in matched.nuclei_without_cell}
        site.compartment = "Nuclei,Cells,Cytoplasm"
        site.objects = site.objects.assign(Metadata_Cells_ObjectNumber=[matched.cell_of.get(int(o), np.nan)
                                                                        for o in numbers])
        site.orphans = matched.cells_without_nucleus
        values = None
        if self.measure:
            from ..features.cellprofiler import measure_cells

            t0 = time.perf_counter()
            todo = np.array([int(o) not in failed for o in numbers], bool)
            measured, more = measure_cells(image, nuclei, matched.cells, numbers[todo],
                                           _placeholder_channels(image.shape[0]))
            values = np.full((len(numbers), measured.shape[1]), np.nan)
            values[todo] = measured
            failed.update(more)
            self.seconds["cellprofiler"] += time.perf_counter() - t0
        return site.rows(values, failed)

    def _cells(self, item: WorkItem, cells: np.ndarray) -> dict:
        """Rows of a chunk of pre-cropped cells (cells with NaN or infinite pixels dropped)."""
        if cells.shape[-1] > INPUT_SIZE or cells.shape[-2] > INPUT_SIZE:
            return skip_rows(item, f"{item.where}: cells of {cells.shape[-2]}x{cells.shape[-1]} are larger than "
                                   f"{INPUT_SIZE}")
        if cells.dtype.kind not in "uif":
            return skip_rows(item, f"{item.where}: pixel type {cells.dtype} is not numeric")
        numbers = np.asarray(item.object_numbers, np.int64)
        bad = ~np.isfinite(cells.reshape(len(cells), -1)).all(axis=1)
        site = _Site(item, pd.DataFrame({"Metadata_ObjectNumber": numbers}), cells, 0, cells.dtype, "Cells", found=0)
        failed = {int(o): "has NaN or infinite pixels" for o in numbers[bad]}
        values = None
        if self.measure and (~bad).any():
            from ..features.cellprofiler import measure_crops

            t0 = time.perf_counter()
            good, why = measure_crops(cells[~bad], _placeholder_channels(cells.shape[1]))
            values = np.full((len(cells), good.shape[1]), np.nan)
            values[~bad] = good
            failed.update({int(numbers[~bad][i]): w for i, w in why.items()})
            self.seconds["cellprofiler"] += time.perf_counter() - t0
        return site.rows(values, failed)

    def __call__(self, batch: dict) -> dict:
        """Several fields at once: their nuclei (and cell) channels go through the segmenter in one call
        (Cellpose batches fields of equal size through the network together, on the GPU when it has one)."""
        rows = [{k: batch[k][i] for k in ("item", "image", "error", "read_seconds") if k in batch}
                for i in range(len(batch["item"]))]
        todo = [i for i, r in enumerate(rows) if not r["error"] and self.needs_segmentation(r["item"])]
        segmented: dict[int, tuple] = {}
        if len(todo) > 1:
            segmented = dict(zip(todo, self.segment([rows[i]["item"] for i in todo], [rows[i]["image"] for i in todo])))
        return concat_rows([self.process(r, segmented.get(i)) for i, r in enumerate(rows)])


class _Site:
    """What the crop stage found in one item, turned into rows: plane rows of the kept objects, a
    :data:`DROP` row (with the reason) for each object left out, and one for the cells found without
    a nucleus (standing for no plane: they were never objects of the site)."""

    def __init__(self, item: WorkItem, objects: pd.DataFrame, crops: np.ndarray, rejected: int, dtype,
                 compartment: str, found: int | None = None):
        self.item, self.objects, self.crops, self.rejected, self.dtype = item, objects, crops, rejected, dtype
        self.compartment, self.orphans, self.found = compartment, 0, found

    def rows(self, values: np.ndarray | None = None, failed: dict[int, str] | None = None) -> dict:
        item, failed = self.item, failed or {}
        numbers = self.objects["Metadata_ObjectNumber"].to_numpy(np.int64)
        ok = np.array([int(o) not in failed for o in numbers], bool)
        c = self.crops.shape[1]
        total = item.site_planes if item.precropped else len(numbers) * c
        rows = []
        if self.orphans:
            rows.append(_note_row(item, f"{item.where}: {self.orphans} cell(s) without a nucleus", DROP, count=0,
                                  site_planes=total))
        rows += [_note_row(item, f"{item.where}: cell {int(o)}: {failed[int(o)]}", DROP, count=c, site_planes=total,
                           object_number=int(o)) for o in numbers[~ok]]
        if ok.any():
            rows.append(plane_rows(item, self.objects[ok].reset_index(drop=True), self.crops[ok],
                                   rejected=self.rejected, dtype=self.dtype, site_planes=total,
                                   measurements=None if values is None else values[ok], compartment=self.compartment,
                                   found=self.found))
        return concat_rows(rows) if rows else skip_rows(item, f"{item.where}: no cells")


# --------------------------------------------------------------------------- encode (actor pool)

def site_indices(batch: dict) -> dict[SiteKey, list[int]]:
    """The row indices of each site in ``batch``, sites in order of first appearance."""
    groups: dict[SiteKey, list[int]] = {}
    for i, key in enumerate(zip(batch["plate"], batch["well"], batch["site"])):
        groups.setdefault(SiteKey(key[0], key[1], int(key[2])), []).append(i)
    return groups


class EncodeStage:
    """Pads, normalises and encodes the crops on the encoder's device; the model is loaded once per actor.

    Parameters
    ----------
    encode : EncodeConfig
        Weights, normalisation, precision, compile, threads (``device`` ``auto``: CUDA if available),
        and ``batch_size``, the planes per forward pass.
    device : str, optional
        Overrides ``encode.device`` (the Ray executor passes what the cluster has).
    features : tuple of str
        Without ``microsnoop`` the crops pass through unencoded (zero features, dropped by the
        collector); the model is still loaded, for its id in the output layout.
    sink : object with ``site`` and ``skip`` methods, optional
        Where finished sites go (``plate_job.SiteSink``). Given one, every site whose planes all
        arrived in this call is assembled and written here, on the encoder's node, and leaves as one
        :data:`DONE` row: the driver then receives a small record per site instead of every plane's
        features (what lets one driver feed many GPUs). The rows of other sites leave encoded, for
        the driver's :class:`SiteCollector`.
    channels : dict plate -> list of channel names
        With ``sink``: the channel names the site tables use.
    """

    def __init__(self, encode: EncodeConfig = EncodeConfig(), device: str | None = None,
                 features: tuple[str, ...] = ("microsnoop",), sink=None, channels: dict | None = None):
        import torch

        from ..encode.embed import Encoder
        device = device or encode.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(int(encode.threads or len(os.sched_getaffinity(0))))
        self.encoder = Encoder(encode.weights, device=device, compile=encode.compile, precision=encode.precision,
                               input_size=encode.input_size)
        a = self.encoder.arithmetic
        self.arithmetic = f"{a['precision']} ({a['why']})"
        self.normalization, self.batch_size = encode.normalization, max(1, int(encode.batch_size))
        self.features = features
        self.encode = "microsnoop" in features
        self.sink, self.channels = sink, channels
        if sink is not None and channels is None:
            raise ValueError("EncodeStage: a sink needs the plates' channel names")
        if sink is not None and not sink.layout.root.is_dir():
            import socket
            raise RuntimeError(f"the output folder {sink.layout.root} is not visible on node {socket.gethostname()}: "
                               "put OUT on storage every node sees (as the inputs are), or set run.site_writes: "
                               "driver")

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        n = len(batch["kind"])
        feats = np.zeros((n, EMBED_DIM), np.float32)
        real = np.flatnonzero(batch["kind"] == PLANE)
        if self.encode:
            for start in range(0, len(real), self.batch_size):
                idx = real[start:start + self.batch_size]
                feats[idx] = self.encoder.embed_crops(crops_of({k: batch[k][idx] for k in CROP_COLUMNS}),
                                                      self.normalization)
        batch = {k: v for k, v in batch.items() if k not in CROP_COLUMNS}
        batch["features"] = feats
        # the actor's busy time, spread over the rows (the driver sums it: encoder utilisation)
        batch["encode_seconds"] = np.full(n, (time.perf_counter() - t0) / max(1, n))
        if "step_seconds" in batch:
            batch["step_seconds"] = batch["step_seconds"].copy()
            batch["step_seconds"][:, STEPS.index("encoder")] += batch["encode_seconds"]
        batch["arithmetic"] = np.full(n, self.arithmetic, dtype=object)  # decided on the actor's own node
        batch["cells"] = np.zeros(n, np.int64)
        return batch if self.sink is None else self._write_complete_sites(batch)

    def _write_complete_sites(self, batch: dict) -> dict:
        """Write the sites complete in ``batch`` here; a DONE row for each, then the other sites' rows."""
        done: dict[SiteKey, int] = {}
        reasons: dict[SiteKey, str] = {}

        def skip(key: SiteKey, reason: str) -> None:
            self.sink.skip(key, reason)
            reasons[key] = reason

        here = SiteCollector(self.sink.site, skip, self.channels, features=self.features,
                             on_site=lambda key, n_cells: done.__setitem__(key, n_cells or 0))
        here.add(batch)
        if not done:
            return batch
        groups = site_indices(batch)
        keys = list(done)
        rows = {k: v[[groups[key][0] for key in keys]].copy() for k, v in batch.items()}
        rows["kind"][:] = DONE
        rows["count"] = rows["site_planes"].copy()
        rows["cells"] = np.array([done[key] for key in keys], np.int64)
        rows["reason"] = np.array([reasons.get(key, "") for key in keys], dtype=object)
        rows["features"][:] = 0
        rows["encode_seconds"] = batch["encode_seconds"][0] * np.array([len(groups[key]) for key in keys], float)
        if "step_seconds" in batch:
            rows["step_seconds"] = np.stack([batch["step_seconds"][groups[key]].sum(axis=0) for key in keys])
        rest = [part for key, parts in here.pending.items() for part in parts]
        return concat_rows([rows] + rest)


# --------------------------------------------------------------------------- collect (driver)

class SiteCollector:
    """Gathers encoded planes per site and hands each site on once it is complete.

    Parameters
    ----------
    write_site : callable(key: SiteKey, cells: DataFrame, dropped: list of dict, rejected: int, arithmetic: str)
        ``cells`` as :func:`assemble_cells`; ``dropped`` the cells left out (``Metadata_ObjectNumber``,
        ``reason``); ``rejected`` the objects found but not cropped (border, size); ``arithmetic``
        the encoder's (its actors decide it on their own nodes: several are joined by ``; ``).
    write_skip : callable(key: SiteKey, reason: str) -> None
    channels : dict plate -> list of channel names
    on_site : callable(key, n_cells or None), optional
        Called after each site, also those written by the encoder actors (progress lines).
    features : tuple of str
        The feature sets the per-cell tables hold (:func:`assemble_cells`).
    """

    def __init__(self, write_site, write_skip, channels: dict[str, list[str]], on_site: Callable | None = None,
                 features: tuple[str, ...] = ("microsnoop",)):
        self.write_site, self.write_skip, self.channels, self.on_site = write_site, write_skip, channels, on_site
        self.features = features
        self.pending: dict[SiteKey, list[dict]] = {}
        self.received: dict[SiteKey, int] = {}
        self.seen: dict[SiteKey, set] = {}
        self.done: set[SiteKey] = set()
        self.sites_done = self.sites_written = self.sites_skipped = 0
        self.duplicates = 0
        self.encode_seconds = 0.0
        #: seconds per step (:data:`STEPS`) summed over every row received
        self.step_seconds = np.zeros(len(STEPS))
        self.arithmetic: set[str] = set()

    @staticmethod
    def _row_ids(part: dict) -> list[tuple]:
        return list(zip(part["kind"].tolist(), part["Metadata_ObjectNumber"].tolist(), part["channel"].tolist()))

    def add(self, batch: dict) -> None:
        """Take encoded rows of any sites. A row that arrives twice (a task retried after a worker or
        node died) is counted once; rows of a site already handed on are ignored."""
        if "encode_seconds" in batch:
            self.encode_seconds += float(np.sum(batch["encode_seconds"]))
        if "step_seconds" in batch:
            self.step_seconds += np.asarray(batch["step_seconds"]).sum(axis=0)
        for key, idx in site_indices(batch).items():
            part = {k: np.asarray(v)[idx] for k, v in batch.items()}
            if key in self.done:
                self.duplicates += len(idx)
                continue
            if (part["kind"] == DONE).any():
                self._done_elsewhere(key, part)
                continue
            seen = self.seen.setdefault(key, set())
            ids = self._row_ids(part)
            fresh = np.array([i not in seen for i in ids]) & ~pd.Series(ids, dtype=object).duplicated().to_numpy()
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

    def _done_elsewhere(self, key: SiteKey, part: dict) -> None:
        """A DONE row: an encoder actor wrote the site (or its skip note) itself."""
        for d in (self.pending, self.received, self.seen):  # rows of an earlier, split attempt
            d.pop(key, None)
        self.done.add(key)
        self.sites_done += 1
        i = int(np.flatnonzero(part["kind"] == DONE)[0])
        written = not part["reason"][i]
        if written:
            self.sites_written += 1
            self.arithmetic.add(str(part["arithmetic"][i]))
        else:
            self.sites_skipped += 1
        if self.on_site is not None:
            self.on_site(key, int(part["cells"][i]) if written else None)

    def _finish(self, key: SiteKey) -> None:
        rows = concat_rows(self.pending.pop(key))
        self.received.pop(key)
        self.seen.pop(key, None)
        self.done.add(key)
        self.sites_done += 1
        cells = None
        if (rows["kind"] == SKIP).any():
            self.write_skip(key, str(rows["reason"][rows["kind"] == SKIP][0]))
            self.sites_skipped += 1
        else:
            drop = rows["kind"] == DROP
            dropped = [{"Metadata_ObjectNumber": int(o), "reason": str(r)}
                       for o, r in zip(rows["Metadata_ObjectNumber"][drop], rows["reason"][drop])]
            kept = {k: v[~drop] for k, v in rows.items()}
            if len(kept["kind"]) == 0:
                self.write_skip(key, f"every cell was left out ({dropped[0]['reason']})")
                self.sites_skipped += 1
            else:
                cells = assemble_cells(kept, self.channels[key.plate], self.features)
                used = sorted(set(kept["arithmetic"].tolist())) if "arithmetic" in kept else []
                self.arithmetic.update(used)
                self.write_site(key, cells, dropped, int(kept["objects_rejected"].max()), "; ".join(used))
                self.sites_written += 1
        if self.on_site is not None:
            self.on_site(key, None if cells is None else len(cells))

    def incomplete(self) -> list[SiteKey]:
        return sorted(self.pending, key=str)


def assemble_cells(rows: dict, channels: list[str], features: tuple[str, ...] = ("microsnoop",)) -> pd.DataFrame:
    """Plane rows of one site -> one row per object with its channels' features side by side
    (``Metadata_ObjectNumber``, the object columns that are known, then the embedding's columns
    and the CellProfiler columns, as ``features`` asks)."""
    from ..encode.embed import feature_names
    c = len(channels)
    order = np.lexsort((rows["channel"], rows["Metadata_ObjectNumber"]))
    first = order[::c]
    blocks = []
    if "microsnoop" in features:
        blocks.append(pd.DataFrame(rows["features"][order].reshape(-1, c * EMBED_DIM), columns=feature_names(channels)))
    if "cellprofiler" in features:
        from ..features.cellprofiler import cellprofiler_names

        names = cellprofiler_names(channels, str(rows["cp_objects"][first][0]).split(","))
        values = np.stack([np.frombuffer(b, np.float64) for b in rows["cp"][first]])
        if values.shape[1] != len(names):  # every object is measured with the same layout: a bug if not
            raise RuntimeError(f"{values.shape[1]} CellProfiler values for {len(names)} names")
        blocks.append(pd.DataFrame(values, columns=names))
    meta = pd.DataFrame({"Metadata_ObjectNumber": rows["Metadata_ObjectNumber"][first].astype(np.int64),
                         **{k: rows[k][first] for k in OBJECT_COLUMNS}})
    found = rows["objects_found"][first] if "objects_found" in rows else np.zeros(0)
    if len(found) and (found > 0).all():  # fields: the site's objects before any subsample (0: cell chunks)
        meta["Metadata_Site_Objects_Found"] = found.astype(np.int64)
    for k in ("Metadata_Crop_Top", "Metadata_Crop_Bottom", "Metadata_Crop_Left", "Metadata_Crop_Right",
              "Metadata_Object_Area", "Metadata_Cells_ObjectNumber"):
        if meta[k].isna().all():
            meta = meta.drop(columns=k)
        elif k != "Metadata_Object_Area" or not meta[k].isna().any():
            meta[k] = meta[k].astype(np.int64)
    return pd.concat([meta.reset_index(drop=True), *blocks], axis=1)
