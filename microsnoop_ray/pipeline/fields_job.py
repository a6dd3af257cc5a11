"""The ``fields`` job: the pipeline's stages in this process, no Ray, for a handful of fields.

The same stage objects as ``profile`` (read -> segment/crop -> encode -> collect), the same
per-cell columns and the same skipped table; output under ``out``::

    cells.parquet    one row per cell (or tile), as a site file of ``profile``
    fields.parquet   one row per field: the mean of its cells, Metadata_Object_Count, Metadata_Objects_Rejected
    skipped.csv      inputs that gave no profile, and why
    qc/<field>.png   with ``png``: outlines and crop windows
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ..errors import CELL_LEFT_OUT, SITE_NOT_PROFILED
from ..io.images import read_centres
from ..io.sources import SiteKey
from ..io.write import write_parquet
from ..profiles.aggregate import feature_columns
from .config import ProfileConfig
from .executors import run_in_process
from .layout import site_table, skipped_row, write_skipped
from .plate_job import segmenter_used, with_input_size
from .stages import CropStage, EncodeStage, SiteCollector, needs_segmentation

log = logging.getLogger(__name__)


def run_fields(cfg: ProfileConfig, masks: Sequence[str | Path] | None = None, centres: str | Path | None = None,
               png: bool = False, progress_print=print) -> dict:
    """Profile the fields of ``cfg.inputs`` (image files, or any input ``profile`` takes) in-process.

    Parameters
    ----------
    cfg : ProfileConfig
        Inputs, ``out``, and the segmentation, crop and encode sections (sphering is not used).
    masks : paths, optional
        One label image per image file, same order (instead of segmenting).
    centres : path, optional
        Table of object centres (CellProfiler columns) to crop around (instead of segmenting).
    png : bool
        Write ``qc/<field>.png``.

    Returns
    -------
    dict: ``fields`` profiled, ``skipped`` inputs, ``cells``, ``seconds``, ``outputs``.
    """
    from ..segment import make_segmenter

    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    seg = cfg.segmentation
    work = cfg.work(masks=masks, centres=read_centres(centres) if centres else None, object_size=seg.diameter)
    cfg = with_input_size(cfg, work.items)
    encode = EncodeStage(cfg.encode, features=cfg.feature_sets)
    sink = _FieldSink(cfg, work, encode.encoder.model_card.model_id, progress_print)
    segmenter, seg_desc = None, None
    if any(needs_segmentation(cfg.crop.mode, it) for it in work.items):
        segmenter, seg_desc = make_segmenter(seg.segmenter, seg.cellpose_model, seg.diameter)
        log.info("segmenting with %s", seg_desc)
    crop = CropStage(seg, cfg.crop, on_field=_qc_picture(out, cfg.crop.mode) if png else None, segmenter=segmenter,
                     features=cfg.feature_sets)
    collector = SiteCollector(sink.site, sink.skip, {p: i.channels for p, i in work.plates.items()},
                              features=cfg.feature_sets)
    run_in_process(work.items, crop, encode, collector, batch_size=cfg.encode.batch_size,
                   fields_per_batch=seg.fields_per_batch)
    if collector.incomplete():  # the in-process executor hands on every plane: this is a bug
        raise RuntimeError(f"sites without all their planes: {collector.incomplete()[:5]}")
    prov = {"command": "fields", "mode": cfg.crop.mode, "features": list(cfg.feature_sets),
            "segmentation": segmenter_used(cfg, work.items, seg_desc),
            "channels": sorted({tuple(i.channels) for i in work.plates.values()}), "config": cfg.to_dict(),
            "aggregation": "mean", "model_card": encode.encoder.model_card.to_dict(encode.encoder.input_size),
            "encoder_arithmetic": encode.encoder.arithmetic, "input_size": encode.encoder.input_size}
    outputs = sink.write(out, prov)
    n_skipped = sum(1 for s in sink.skipped if s["kind"] == SITE_NOT_PROFILED)
    progress_print(f"{len(sink.fields)} fields profiled, {n_skipped} skipped (see {out / 'skipped.csv'})")
    return {"fields": len(sink.fields), "skipped": len(sink.skipped),
            "cells": int(sum(n for _, n, _, _ in sink.fields)), "seconds": round(time.perf_counter() - t0, 2),
            "outputs": [str(p) for p in outputs]}


def _qc_picture(out: Path, mode: str) -> Callable:
    """The crop stage's ``on_field``: a picture per field of its outlines and crop windows in ``out/qc``."""
    from ..plots import draw_field

    def qc(item, image, labels, prep) -> None:
        name = Path(item.file_name or f"{item.plate}_{item.well}_{item.site}").stem
        objects = prep.objects if mode == "cells" and len(prep.objects) else None
        draw_field(image[item.nuclei_channel], out / "qc" / f"{name}.png", labels, objects,
                   f"{item.file_name or item.where}: {len(prep.crops)} {mode} ({len(prep.rejected)} rejected)"
                   f"{' SKIPPED' if prep.skip_reason else ''}")
    return qc


class _FieldSink:
    """What ``fields`` keeps of each finished site (its cells, a field row, what was left out), and the
    files it writes at the end: ``cells.parquet``, ``fields.parquet`` and ``skipped.csv``."""

    def __init__(self, cfg: ProfileConfig, work, model_id: str, progress_print):
        self.cfg, self.model_id, self.say = cfg, model_id, progress_print
        self.files = {it.key: it.file_name for it in work.items if it.file_name is not None}
        self.cells: list[pd.DataFrame] = []
        self.fields: list[tuple] = []
        self.skipped = [dict(p, Metadata_FileName=None) for p in work.problems]

    def site(self, key: SiteKey, cells: pd.DataFrame, dropped: list, rejected: int, arithmetic: str) -> None:
        name = self.files.get(key)
        self.cells.append(site_table(key, cells, self.model_id, self.cfg.batch, name))
        self.fields.append((key, len(cells), rejected, cells[feature_columns(cells)].to_numpy().mean(axis=0)))
        self.skipped.extend(skipped_row(key, CELL_LEFT_OUT, d["reason"], name) for d in dropped)
        self.say(f"{name or key}: {len(cells)} {self.cfg.crop.mode}")

    def skip(self, key: SiteKey, reason: str) -> None:
        self.skipped.append(skipped_row(key, SITE_NOT_PROFILED, reason, self.files.get(key)))
        self.say(f"{self.files.get(key) or key}: skipped: {reason}")

    def write(self, out: Path, prov: dict) -> list[Path]:
        outputs = []
        if self.cells:
            cells = pd.concat(self.cells, ignore_index=True)
            outputs.append(write_parquet(cells, out / "cells.parquet", prov))
            meta = pd.DataFrame([{"Metadata_Plate": k.plate, "Metadata_Well": k.well, "Metadata_Site": k.site,
                                  "Metadata_FileName": self.files.get(k), "Metadata_Model": self.model_id,
                                  "Metadata_Object_Count": n, "Metadata_Objects_Rejected": r}
                                 for k, n, r, _ in self.fields])
            if meta["Metadata_FileName"].isna().all():
                meta = meta.drop(columns="Metadata_FileName")
            fields = pd.concat([meta, pd.DataFrame(np.stack([f for *_, f in self.fields]).astype(np.float32),
                                                   columns=feature_columns(cells))], axis=1)
            outputs.append(write_parquet(fields, out / "fields.parquet", prov))
        write_skipped(self.skipped, out / "skipped.csv")
        return outputs
