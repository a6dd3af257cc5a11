"""The output tree of a profiling run, the per-cell table of a site, and the skipped-inputs table.

Layout (Cell Painting Gallery, deep-learning convention) under ``out``::

    embeddings/<model_id>/<batch>/<plate>/<well>-<site>/embeddings.parquet   one row per cell
    embeddings/<model_id>/<batch>/<plate>/<well>-<site>/skipped.json         or why there is none
    embeddings/<model_id>/<batch>/<plate>/<well>-<site>/dropped.json         cells left out
    profiles/<model_id>/<batch>/<plate>/<plate>.parquet                      one row per well
    profiles/<model_id>/<batch>/<plate>/<plate>_sphered.parquet              after sphering
    profiles/<model_id>/treatments.parquet                                   consensus profiles
    skipped.csv, summary.json, run_config.yaml

``profile`` and ``fields`` write the same per-cell columns (:func:`site_table`) and the same
skipped table (:data:`SKIPPED_COLUMNS`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from ..config import inside
from ..errors import InputError
from ..io.atomic import write_json, write_text
from ..io.sources import SiteKey
from ..io.write import write_parquet
from ..io.zarr_plate import split_well

#: The levels of a run's profile files, as ``summary.json`` lists them under ``outputs``.
OUTPUT_LEVELS = ("well", "well (normalized)", "well (feature selected)", "well (sphered)", "treatment")
WELL, WELL_NORMALIZED, WELL_SELECTED, WELL_SPHERED, TREATMENT = OUTPUT_LEVELS
#: Columns of ``skipped.csv`` (``profile`` and ``fields``); ``kind`` is one of
#: :data:`~microsnoop_ray.errors.SKIP_KINDS`.
SKIPPED_COLUMNS = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_FileName", "kind", "reason"]
#: The site's own columns, first in every per-cell table; a plate map's columns follow them.
SITE_COLUMNS = ["Metadata_Batch", "Metadata_Plate", "Metadata_Well", "Metadata_Row", "Metadata_Column",
                "Metadata_Site", "Metadata_FileName", "Metadata_Model"]


class Layout:
    """Paths of the output tree (every name checked to stay under ``root``)."""

    def __init__(self, root: str | os.PathLike, model_id: str):
        self.root = Path(root).resolve()
        self.model_id = model_id

    def _safe(self, *parts) -> Path:
        for p in parts:
            s = str(p)
            if not s or s in (".", "..") or "/" in s or "\\" in s or "\x00" in s:
                raise InputError(s, "is not a safe name for an output folder (plate, batch or well names must "
                                    "not contain path separators)")
        # and no symbolic link inside the output tree may lead out of it
        return inside(self.root, Path(*map(str, parts)), "output path")

    def site_dir(self, batch: str, key: SiteKey) -> Path:
        return self._safe("embeddings", self.model_id, batch, key.plate, f"{key.well or 'field'}-{key.site}")

    def plate_dir(self, batch: str, plate: str) -> Path:
        return self._safe("profiles", self.model_id, batch, plate)

    def treatments(self) -> Path:
        return self._safe("profiles", self.model_id) / "treatments.parquet"

    def site_done(self, batch: str, key: SiteKey, retry_skipped: bool = False) -> bool:
        """A site is done when its embeddings are written, or (unless ``retry_skipped``) its skip reason."""
        d = self.site_dir(batch, key)
        return (d / "embeddings.parquet").exists() or (not retry_skipped and (d / "skipped.json").exists())

    def clear_notes(self, batch: str, key: SiteKey) -> None:
        """Remove a site's skip and drop notes before it is done again (never kept beside a new result)."""
        d = self.site_dir(batch, key)
        (d / "skipped.json").unlink(missing_ok=True)
        (d / "dropped.json").unlink(missing_ok=True)

    def write_site(self, batch: str, key: SiteKey, table: pd.DataFrame, dropped: list[dict],
                   provenance: dict) -> Path:
        d = self.site_dir(batch, key)
        if dropped:  # written first: a site with embeddings.parquet is complete, its notes included
            write_json(dropped, d / "dropped.json")
        return write_parquet(table, d / "embeddings.parquet", provenance)

    def write_skip(self, batch: str, key: SiteKey, reason: str) -> Path:
        return write_json({"reason": reason}, self.site_dir(batch, key) / "skipped.json")

    def read_notes(self, batch: str, key: SiteKey) -> tuple[bool, str | None, list[dict]]:
        """(embeddings written, skip reason or None, dropped cells) of a site."""
        d = self.site_dir(batch, key)
        skipped = json.loads((d / "skipped.json").read_text())["reason"] if (d / "skipped.json").exists() else None
        dropped = json.loads((d / "dropped.json").read_text()) if (d / "dropped.json").exists() else []
        return (d / "embeddings.parquet").exists(), skipped, dropped


def site_table(key: SiteKey, cells: pd.DataFrame, model_id: str, batch: str | None = None,
               file_name: str | None = None, annotations: dict | None = None) -> pd.DataFrame:
    """The per-cell table of one site: :data:`SITE_COLUMNS` (those that are known), the plate map's
    columns of its well, then ``cells`` (object columns and features, :func:`~.stages.assemble_cells`)."""
    meta: dict = {}
    if batch is not None:
        meta["Metadata_Batch"] = batch
    meta["Metadata_Plate"] = key.plate
    meta["Metadata_Well"] = key.well
    if key.well is not None:
        meta["Metadata_Row"], meta["Metadata_Column"] = split_well(key.well)
    meta["Metadata_Site"] = int(key.site)
    if file_name is not None:
        meta["Metadata_FileName"] = file_name
    meta["Metadata_Model"] = model_id
    meta.update(annotations or {})
    return pd.concat([pd.DataFrame(meta, index=cells.index), cells], axis=1)


def skipped_row(key: SiteKey | tuple, kind: str, reason: str, file_name: str | None = None) -> dict:
    plate, well, site = key
    return {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site, "Metadata_FileName": file_name,
            "kind": kind, "reason": reason}


def write_skipped(skipped: list[dict], path: str | os.PathLike) -> Path:
    """The skipped-inputs table as CSV (atomically), sorted by plate and well."""
    df = pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)
    df["Metadata_Site"] = pd.array(df["Metadata_Site"], dtype="Int64")
    df = df.sort_values(["Metadata_Plate", "Metadata_Well"], kind="stable", na_position="first")
    return write_text(df.to_csv(index=False), path)
