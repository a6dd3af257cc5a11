"""The plate job: list the work, stream it through Ray Data, write and post-process the profiles.

Output layout (Cell Painting Gallery, deep-learning convention) under ``out``::

    embeddings/<model_id>/<batch>/<plate>/<well>-<site>/embeddings.parquet   one row per cell
    embeddings/<model_id>/<batch>/<plate>/<well>-<site>/skipped.json         or why there is none
    profiles/<model_id>/<batch>/<plate>/<plate>.parquet                      one row per well
    profiles/<model_id>/<batch>/<plate>/<plate>_sphered.parquet              after sphering
    profiles/<model_id>/treatments.parquet                                   consensus profiles
    skipped.csv, summary.json, run_config.yaml

Sites are written atomically, one file each, as soon as they are complete: a rerun lists
what exists and sends only the missing sites through the pipeline. The post-processing
(aggregation, plate map, sphering, treatments) is a pure function of the site files and
is redone on every run, so its output is the same whether the run was interrupted or not.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from ..config import check_options, inside, save_config
from ..errors import InputError
from ..io.tables import join_platemap, read_cell_array, read_image_table, read_platemap, sample_per_group
from ..io.write import write_parquet
from ..io.zarr_plate import open_plate, split_well
from ..profiles.aggregate import SITE_KEYS, WELL_KEYS, aggregate, feature_columns, treatment_profiles
from ..profiles.sphering import DEFAULT_REGULARIZATION, REGULARIZATIONS, sphere_profiles
from .stages import CropStage, EncodeStage, SiteCollector, read_item, site_key

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ProfileConfig:
    """Everything the ``profile`` command's flags and config file hold."""

    inputs: list = dataclasses.field(default_factory=list)
    out: str = "profiles-out"
    platemap: str | None = None
    batch: str = "default"
    weights: str | None = None
    mode: str = "cells"
    segmenter: str = "auto"
    cellpose_model: str | None = None
    diameter: float = 30.0
    nuclei_channel: Any = 0
    labels: str | None = None
    rescale_constant: float = 2.5
    border: str = "drop"
    tile_overlap: float = 0.1
    normalization: str = "default"
    max_cells_per_site: int | None = None
    cell_table: str | None = None
    channel_names: list | None = None
    cells_chunk: int = 256
    aggregation: str = "mean"
    sphering: dict = dataclasses.field(default_factory=lambda: {"scope": "plate", "method": "zca-cor",
                                                               "regularization": DEFAULT_REGULARIZATION,
                                                               "epsilon": None, "fit_on": "wells", "fallback": "global",
                                                               "required": False})
    treatment_keys: list = dataclasses.field(default_factory=lambda: ["Metadata_Compound", "Metadata_Concentration"])
    batch_size: int = 64
    encoder_actors: int | None = None
    encoder_cpus: float = 1.0
    encoder_threads: int | None = None
    crop_actors: int | None = None
    crop_cpus: float = 0.5
    crop_resources: dict | None = None
    encode_resources: dict | None = None
    device: str = "auto"
    compile: bool = False
    precision: str = "fp32"  # encoder arithmetic: fp32, tf32, bf16 or fp16 (see Encoder)
    segment_gpu_share: float = 0.0  # share of each GPU for Cellpose in the crop actors (0: segment on CPUs)
    fields_per_crop_batch: int = 1  # fields a crop actor segments together (Cellpose batches them)
    encoder_batches_in_flight: int = 4  # batches queued per encoder actor (>= 2: the next arrives during compute)
    retry_skipped: bool = False
    drop_constant: bool = False
    illum: str = "none"  # "none", "compute" (per plate and channel, written under out/illum) or a folder
    progress: bool = True
    seed: int = 0

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> "ProfileConfig":
        check_options(cls, d, "profile")
        d = dict(d)
        if "sphering" in d and d["sphering"] is not None:
            given = dict(d["sphering"])
            if given.get("epsilon") is not None and "regularization" not in given:
                given["regularization"] = "epsilon"  # a fixed epsilon asks for the epsilon mode
            d["sphering"] = {**cls().sphering, **given}
            reg, eps = d["sphering"]["regularization"], d["sphering"]["epsilon"]
            if reg not in REGULARIZATIONS:
                raise ValueError(f"sphering.regularization must be one of {REGULARIZATIONS}, not {reg!r}")
            if eps is not None and reg != "epsilon":
                raise ValueError(f"sphering.epsilon {eps} is only used with regularization 'epsilon', not {reg!r}")
        cfg = cls(**d)
        if not cfg.inputs:
            raise ValueError("no input plates given")
        if cfg.aggregation not in ("mean", "median"):
            raise ValueError(f"aggregation must be mean or median, not {cfg.aggregation!r}")
        if cfg.mode not in ("cells", "tiles", "rescale"):
            raise ValueError(f"mode must be cells, tiles or rescale, not {cfg.mode!r}")
        if not 0.0 <= cfg.segment_gpu_share < 1.0:
            raise ValueError(f"segment_gpu_share must lie in [0, 1), not {cfg.segment_gpu_share}")
        from ..encode import PRECISIONS
        if cfg.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {cfg.precision!r}")
        return cfg

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


# --------------------------------------------------------------------------- listing the work

@dataclasses.dataclass
class PlateInfo:
    name: str
    batch: str
    channels: list
    source: str
    sites: list  # (well, site)


def _is_plate_folder(path: Path) -> bool:
    return path.is_dir() and ((path / ".zattrs").exists() or (path / "zarr.json").exists())


def list_work(cfg: ProfileConfig) -> tuple[list[dict], dict[str, PlateInfo], list[dict]]:
    """Expand the inputs into work items (fields or cell chunks), plate descriptions and problems."""
    items, plates, problems = [], {}, []

    def add_plate(info: PlateInfo) -> None:
        if info.name in plates:
            raise InputError(info.source, f"plate {info.name} is also given by {plates[info.name].source}")
        plates[info.name] = info

    for raw in cfg.inputs:
        path = Path(raw)
        if _is_plate_folder(path):
            plate = open_plate(path)
            fields = list(plate.fields())
            channels = plate.channel_names(fields[0]) if fields else []
            nuc = _channel_index(cfg.nuclei_channel, channels, path)
            add_plate(PlateInfo(plate.name, cfg.batch, channels, str(path), [(f.well, f.site) for f in fields]))
            for f in fields:
                items.append(_item("zarr", plate.name, f.well, f.site, len(channels), path=str(path), group=f.path,
                                   nuclei_channel=nuc, labels=cfg.labels or ""))
        elif path.suffix in (".parquet", ".csv", ".gz", ".tsv") and path.is_file():
            table, channels = read_image_table(path)
            nuc = _channel_index(cfg.nuclei_channel, channels, path)
            dup = table.duplicated(["Metadata_Plate", "Metadata_Well", "Metadata_Site"], keep="first")
            for r in table[dup].itertuples(index=False):
                problems.append({"Metadata_Plate": r.Metadata_Plate, "Metadata_Well": r.Metadata_Well,
                                 "Metadata_Site": r.Metadata_Site, "kind": "duplicate field",
                                 "reason": f"duplicate field in {path.name}; the first row was used"})
            table = table[~dup]
            for name, sub in table.groupby("Metadata_Plate", sort=True):
                add_plate(PlateInfo(str(name), cfg.batch, channels, str(path),
                                    list(zip(sub["Metadata_Well"], sub["Metadata_Site"].astype(int)))))
                for r in sub.itertuples(index=False):
                    files = [getattr(r, f"Path_{c}") for c in channels]
                    items.append(_item("files", str(name), r.Metadata_Well, int(r.Metadata_Site), len(channels),
                                       files=json.dumps(files), nuclei_channel=nuc))
        elif path.suffix in (".npz", ".npy") and path.is_file():
            arr, meta = read_cell_array(path, cfg.cell_table)
            channels = list(cfg.channel_names or [f"ch{i}" for i in range(arr.shape[1])])
            if len(channels) != arr.shape[1]:
                raise InputError(path, f"{len(channels)} channel names for {arr.shape[1]} channels")
            meta = meta.assign(_row=np.arange(len(meta)))
            if cfg.max_cells_per_site:
                meta = meta.iloc[sample_per_group(meta, ["Metadata_Plate", "Metadata_Well", "Metadata_Site"],
                                                  cfg.max_cells_per_site, cfg.seed)]
            sizes = meta.groupby(["Metadata_Plate", "Metadata_Well", "Metadata_Site"]).size()
            meta["site_planes"] = [sizes[k] * len(channels) for k in
                                   zip(meta["Metadata_Plate"], meta["Metadata_Well"], meta["Metadata_Site"])]
            for name, sub in meta.groupby("Metadata_Plate", sort=True):
                sites = sub[["Metadata_Well", "Metadata_Site"]].drop_duplicates()
                add_plate(PlateInfo(str(name), str(sub["Metadata_Batch"].iloc[0]) if "Metadata_Batch" in sub
                                    else cfg.batch, channels, str(path),
                                    list(zip(sites["Metadata_Well"], sites["Metadata_Site"].astype(int)))))
                for (well, site), cells in sub.groupby(["Metadata_Well", "Metadata_Site"], sort=True):
                    for start in range(0, len(cells), cfg.cells_chunk):
                        part = cells.iloc[start:start + cfg.cells_chunk]
                        m = part[["Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber", "site_planes"]]
                        items.append(_item("cells", str(name), well, int(site), len(channels), path=str(path),
                                           rows=json.dumps(part["_row"].astype(int).tolist()),
                                           cells_meta=m.to_json(orient="records")))
        else:
            raise InputError(path, "not an OME-Zarr plate folder, an image table (.parquet/.csv) or a cell array "
                                   "(.npz/.npy)")
    return items, plates, problems


def _channel_index(value, channels: list, where) -> int:
    if isinstance(value, str) and not value.isdigit():
        if value not in channels:
            raise InputError(where, f"nuclei channel {value!r} is not one of the plate's channels {channels}")
        return channels.index(value)
    idx = int(value)
    if not 0 <= idx < max(1, len(channels)):
        raise InputError(where, f"nuclei channel index {idx} is out of range for {len(channels)} channels")
    return idx


def _item(kind, plate, well, site, n_channels, **kw) -> dict:
    base = {"kind": kind, "plate": plate, "well": well, "site": int(site), "n_channels": int(n_channels),
            "path": "", "group": "", "files": "", "rows": "", "cells_meta": "", "nuclei_channel": 0,
            "labels": "", "illum": ""}
    base.update(kw)
    return base


# --------------------------------------------------------------------------- the output layout

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

    def site_dir(self, batch, plate, well, site) -> Path:
        return self._safe("embeddings", self.model_id, batch, plate, f"{well}-{site}")

    def plate_dir(self, batch, plate) -> Path:
        return self._safe("profiles", self.model_id, batch, plate)

    def treatments(self) -> Path:
        return self._safe("profiles", self.model_id) / "treatments.parquet"


def site_done(layout: Layout, batch, plate, well, site, retry_skipped: bool = False) -> bool:
    d = layout.site_dir(batch, plate, well, site)
    return (d / "embeddings.parquet").exists() or (not retry_skipped and (d / "skipped.json").exists())


def _atomic_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- provenance and annotations

def _file_stamp(path: Path) -> dict:
    """Size and modification time of an input (for a Zarr folder: of its root metadata file)."""
    target = path
    if path.is_dir():
        target = next((path / n for n in ("zarr.json", ".zattrs") if (path / n).exists()), path)
    st = target.stat()
    return {"path": str(path.resolve()), "kind": "folder" if path.is_dir() else "file", "bytes": st.st_size,
            "mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime)),
            **({"stamped": target.name} if target is not path else {})}


def run_provenance(cfg: ProfileConfig, items: list[dict]) -> dict:
    """What a reader of any output file needs to know how it was made (stored in every Parquet file)."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    from ..segment import describe_segmenter

    try:
        pkg = version("microsnoop-ray")
    except PackageNotFoundError:  # a source checkout that was never installed
        from .. import __version__ as pkg
    kinds = {it["kind"] for it in items}
    used = []
    if kinds - {"cells"}:
        used.append("supplied label images" if cfg.labels else
                    describe_segmenter(cfg.segmenter, cfg.cellpose_model, cfg.diameter) if cfg.mode == "cells"
                    else f"none ({cfg.mode} mode)")
    if "cells" in kinds:
        used.append("none (pre-cropped cell arrays)")
    files = [_file_stamp(Path(p)) for p in cfg.inputs]
    if cfg.cell_table:
        files.append(_file_stamp(Path(cfg.cell_table)))
    pm = None
    if cfg.platemap:
        pm = {"path": str(Path(cfg.platemap).resolve()),
              "sha256": hashlib.sha256(Path(cfg.platemap).read_bytes()).hexdigest()}
    return {"package": f"microsnoop-ray {pkg}", "segmenter_used": "; ".join(used), "inputs": files,
            "platemap": pm, "config": cfg.to_dict()}


def well_annotations(platemap: pd.DataFrame | None, plate: str, well: str, present) -> dict:
    """The plate-map columns of one well (not those already in ``present``), for per-cell rows."""
    if platemap is None:
        return {}
    rows = platemap[platemap["Metadata_Well"] == well]
    if "Metadata_Plate" in platemap:
        rows = rows[rows["Metadata_Plate"] == plate]
    own = {"Metadata_Plate", "Metadata_Well", "Metadata_Batch", "Metadata_Row", "Metadata_Column", "Metadata_Site",
           "Metadata_Model"}  # the site's own columns win over a plate map's
    cols = [c for c in platemap.columns if c not in own and c not in set(present)]
    if rows.empty:
        return {c: None for c in cols}
    r = rows.iloc[0]
    return {c: (None if pd.isna(r[c]) else r[c]) for c in cols}


def prepare_illumination(cfg: ProfileConfig, items: list[dict], plates: dict[str, PlateInfo], layout: Layout,
                         progress_print=print) -> dict | None:
    """Point every field at its plate's illumination functions, computing them first for ``illum: compute``.

    ``compute`` reads every field of a plate once (a running sum per channel) and writes
    ``<out>/illum/<plate>/<plate>_Illum<Channel>.npy`` with a PNG each; a rerun reuses the files.
    A folder holds such files (Cell Painting Gallery layout); a missing one skips the plate's sites
    with a reason naming the file. Returns what was done, for the provenance (None: no correction).
    """
    from ..io.illum import IllumAccumulator, illum_paths, save_functions

    if cfg.illum in (None, "", "none"):
        return None
    if any(it["kind"] == "cells" for it in items):
        raise InputError("--illum", "illumination correction applies to whole fields, not to pre-cropped cell arrays")
    compute = cfg.illum == "compute"
    folder = layout.root / "illum" if compute else Path(cfg.illum)
    if not compute and not folder.is_dir():
        raise InputError(folder, "illumination folder does not exist (expected <folder>/<plate>/<plate>_Illum<Channel>.npy)")
    note = {"mode": "compute" if compute else "folder", "folder": str(folder.resolve()), "plates": {}}
    for plate, info in sorted(plates.items()):
        paths = illum_paths(folder, plate, info.channels)
        mine = [it for it in items if it["plate"] == plate]
        fields = None
        if compute and not all(p.exists() for p in paths):
            t0 = time.perf_counter()
            acc, refused = IllumAccumulator(), 0
            for it in mine:
                row = read_item(it)
                try:
                    if row["error"]:
                        raise InputError(it["plate"], row["error"])
                    acc.add(row["image"])
                except InputError:
                    refused += 1  # the site itself is skipped with its reason by the pipeline
            save_functions(folder, plate, info.channels, acc.functions())
            fields = acc.n
            progress_print(f"  {plate}: illumination functions from {acc.n} field(s) ({refused} unreadable or "
                           f"of another shape) in {time.perf_counter() - t0:.1f} s -> {paths[0].parent}")
        note["plates"][plate] = {"files": [str(p) for p in paths], **({"fields": fields} if fields else {})}
        for it in mine:
            it["illum"] = json.dumps([str(p) for p in paths])
    return note


# --------------------------------------------------------------------------- running it

def run_profile(cfg: ProfileConfig, progress_print=print) -> dict:
    """Profile the plates of ``cfg`` on the current Ray cluster (``ray.init`` must have run).

    Returns the summary written to ``summary.json``.
    """

    from ..model.load import load_model

    t0 = time.perf_counter()
    model = load_model(cfg.weights)
    card = model.model_card
    model_id = card.model_id if card else "microsnoop-unknown"
    layout = Layout(cfg.out, model_id)
    items, plates, problems = list_work(cfg)
    illumination = prepare_illumination(cfg, items, plates, layout, progress_print)
    save_config({**cfg.to_dict(), "model_id": model_id}, layout.root / "run_config.yaml")
    batch_of = {p: info.batch for p, info in plates.items()}
    todo = [it for it in items if not site_done(layout, batch_of[it["plate"]], it["plate"], it["well"], it["site"],
                                                cfg.retry_skipped)]
    for it in todo:  # a retried skip is replaced, never kept beside its new result
        d = layout.site_dir(batch_of[it["plate"]], it["plate"], it["well"], it["site"])
        (d / "skipped.json").unlink(missing_ok=True)
        (d / "dropped.json").unlink(missing_ok=True)
    n_sites_todo = len({site_key(i["plate"], i["well"], i["site"]) for i in todo})
    progress_print(f"microsnoop-ray profile: {len(plates)} plate(s), {len(items)} work item(s); "
                   f"{n_sites_todo} site(s) to do, {sum(len(p.sites) for p in plates.values()) - n_sites_todo} "
                   f"already done")
    platemap = read_platemap(cfg.platemap) if cfg.platemap else None
    provenance = {"model_card": card.to_dict() if card else None, "mode": cfg.mode, "segmenter": cfg.segmenter,
                  "normalization": cfg.normalization, "rescale_constant": cfg.rescale_constant,
                  "border": cfg.border, "max_cells_per_site": cfg.max_cells_per_site,
                  **run_provenance(cfg, items), "illumination": illumination}
    counts = {"sites_written": 0, "sites_skipped": 0}

    def write_site(plate, well, site, cells: pd.DataFrame, dropped: list | None = None) -> None:
        batch = batch_of[plate]
        row, col = split_well(well)
        meta = pd.DataFrame({"Metadata_Batch": batch, "Metadata_Plate": plate, "Metadata_Well": well,
                             "Metadata_Row": row, "Metadata_Column": col, "Metadata_Site": site,
                             "Metadata_Model": model_id, **well_annotations(platemap, plate, well, cells.columns)},
                            index=cells.index)
        table = pd.concat([meta, cells], axis=1)
        d = layout.site_dir(batch, plate, well, site)
        if dropped:  # written first: a site with embeddings.parquet is complete, its notes included
            _atomic_json(dropped, d / "dropped.json")
        write_parquet(table, d / "embeddings.parquet",
                      {**provenance, "channels": plates[plate].channels})
        counts["sites_written"] += 1

    def write_skip(plate, well, site, reason) -> None:
        _atomic_json({"reason": reason}, layout.site_dir(batch_of[plate], plate, well, site) / "skipped.json")
        counts["sites_skipped"] += 1

    if todo:
        collector = SiteCollector(write_site, write_skip, {p: i.channels for p, i in plates.items()})
        t_run = time.perf_counter()
        ds, pools = build_dataset(cfg, todo)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            collector.add(batch)
        counts["duplicate_rows_ignored"] = collector.duplicates
        counts["pipeline_seconds"] = round(time.perf_counter() - t_run, 2)
        counts["encoder_busy_seconds"] = round(collector.encode_seconds, 2)
        counts["encoder_actors"] = pools["encoder_actors"]
        counts["encoder_busy_share"] = round(collector.encode_seconds / max(1e-9, pools["encoder_actors"] *
                                                                           counts["pipeline_seconds"]), 3)
        if collector.incomplete():
            raise RuntimeError(f"{len(collector.incomplete())} site(s) did not receive all their planes: "
                               f"{collector.incomplete()[:5]}")
    summary = postprocess(cfg, plates, layout, problems, provenance, platemap)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["this_run"] = counts
    _atomic_json(summary, layout.root / "summary.json")
    for plate, s in summary["plates"].items():
        progress_print(f"  {plate}: {s['wells']} wells, {s['sites']} sites, {s['cells']} cells, "
                       f"{s['sites_skipped']} site(s) skipped")
    return summary


def _fits(total: Mapping[str, float], need: Mapping[str, float] | None) -> int | None:
    """How many actors that each need the custom resources ``need`` fit in the cluster (None: no need given)."""
    if not need:
        return None
    missing = [k for k in need if total.get(k, 0) < need[k]]
    if missing:
        raise ValueError(f"the cluster has no node with the resource(s) {missing} that the actors ask for "
                         f"(cluster resources: {sorted(k for k in total if not k.startswith('node:'))})")
    return max(1, min(int(total[k] // v) for k, v in need.items()))


def build_dataset(cfg: ProfileConfig, items: list[dict]):
    """The Ray Data pipeline over work items (resources taken from the running cluster), and the
    actor pool sizes it chose: ``(dataset, {"crop_actors": n, "encoder_actors": n})``."""
    import ray
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(cfg.progress)
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 1)), float(res.get("GPU", 0))
    use_gpu = cfg.device in ("auto", "cuda") and gpus >= 1
    n_enc = cfg.encoder_actors or _fits(res, cfg.encode_resources) or (int(gpus) if use_gpu else 1)
    enc_cpus = 0.0 if use_gpu else float(cfg.encoder_cpus)
    # leave room for the read tasks: actor pools that reserve every CPU would starve them
    spare = cpus - n_enc * enc_cpus - 0.5
    n_crop = cfg.crop_actors or _fits(res, cfg.crop_resources) or max(1, int(spare // cfg.crop_cpus))
    read_cpus = min(0.25, max(0.05, spare))
    log.info("pipeline: %d crop actor(s) x %.2f CPU, %d encoder actor(s) x %s, reads %.2f CPU", n_crop,
             cfg.crop_cpus, n_enc, "1 GPU" if use_gpu else f"{enc_cpus} CPU", read_cpus)
    options = {k: getattr(cfg, k) for k in ("mode", "segmenter", "cellpose_model", "diameter", "rescale_constant",
                                            "border", "tile_overlap", "max_cells_per_site", "seed")}
    crop_res = {"num_cpus": cfg.crop_cpus}
    enc_gpus = 1.0
    if use_gpu and cfg.segment_gpu_share > 0:
        # Cellpose shares each GPU with its encoder actor: the crop actors split the share between them
        per_gpu = max(1, -(-n_crop // int(gpus)))
        crop_res["num_gpus"] = cfg.segment_gpu_share / per_gpu
        enc_gpus = 1.0 - cfg.segment_gpu_share
        options["gpu"] = True
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 1000)))
    ds = ds.map(read_item, num_cpus=read_cpus)
    ds = ds.map_batches(CropStage, fn_constructor_args=(options,), batch_size=cfg.fields_per_crop_batch,
                        batch_format="numpy", compute=ActorPoolStrategy(min_size=1, max_size=n_crop), **crop_res,
                        **({"resources": dict(cfg.crop_resources)} if cfg.crop_resources else {}))
    enc_res = {"num_gpus": enc_gpus} if use_gpu else {"num_cpus": enc_cpus}
    if cfg.encode_resources:
        enc_res["resources"] = dict(cfg.encode_resources)
    ds = ds.map_batches(EncodeStage, fn_constructor_kwargs={"weights": cfg.weights, "device": "cuda" if use_gpu
                                                            else "cpu", "threads": cfg.encoder_threads,
                                                            "compile": cfg.compile,
                                                            "normalization": cfg.normalization,
                                                            "precision": cfg.precision},
                        batch_size=cfg.batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=n_enc, max_tasks_in_flight_per_actor=max(
                            2, cfg.encoder_batches_in_flight)),
                        **enc_res)
    return ds, {"crop_actors": n_crop, "encoder_actors": n_enc}


# --------------------------------------------------------------------------- post-processing (pure)

def read_sites(layout: Layout, plates: dict[str, PlateInfo], method: str = "mean",
               ) -> tuple[pd.DataFrame, list[dict]]:
    """Site profiles from the written site files (one file in memory at a time), and what is missing."""
    rows, skipped = [], []
    for plate, info in sorted(plates.items()):
        for well, site in sorted(set(info.sites)):
            d = layout.site_dir(info.batch, plate, well, site)
            f = d / "embeddings.parquet"
            if f.exists():
                cells = pd.read_parquet(f)
                keys = SITE_KEYS + ["Metadata_Row", "Metadata_Column"]
                rows.append(aggregate(cells[keys + feature_columns(cells)], keys, method))
                if (d / "dropped.json").exists():
                    skipped += [{"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site,
                                 "kind": "cell left out", "reason": c["reason"]}
                                for c in json.loads((d / "dropped.json").read_text())]
            else:
                reason = json.loads((d / "skipped.json").read_text())["reason"] if (d / "skipped.json").exists() \
                    else "not processed (interrupted run? rerun the same command)"
                skipped.append({"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site,
                                "kind": "site not profiled", "reason": reason})
    sites = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    return sites, skipped


def postprocess(cfg: ProfileConfig, plates: dict[str, PlateInfo], layout: Layout, problems: list[dict],
                provenance: dict, platemap: pd.DataFrame | None = None) -> dict:
    """Site -> well aggregation, plate map, sphering, treatments; writes every profile file."""
    sites, skipped = read_sites(layout, plates, cfg.aggregation)
    skipped = problems + skipped
    summary = {"model_id": layout.model_id, "out": str(layout.root), "plates": {}, "outputs": [],
               "aggregation": cfg.aggregation, "sphering": None,
               "provenance": {k: v for k, v in provenance.items() if k != "model_card"}}
    if sites.empty:
        _write_skipped(skipped, layout)
        summary["plates"] = {p: {"wells": 0, "sites": 0, "cells": 0, "sites_skipped": len(i.sites)}
                             for p, i in plates.items()}
        summary["skipped"] = len(skipped)
        return summary
    wells = aggregate(sites.drop(columns=["Metadata_Site"]), WELL_KEYS + ["Metadata_Row", "Metadata_Column"],
                      cfg.aggregation)
    n_sites = sites.groupby(["Metadata_Plate", "Metadata_Well"]).size().rename("Metadata_Site_Count").reset_index()
    wells = wells.merge(n_sites, on=["Metadata_Plate", "Metadata_Well"], how="left")
    wells, map_problems = join_platemap(wells, platemap)
    wells = wells.drop(columns=["Metadata_Model"], errors="ignore")
    wells.insert(3, "Metadata_Model", layout.model_id)
    skipped += [dict(p, Metadata_Site=None, kind="plate map") for p in map_problems]
    constant = constant_features(sites, plates)
    summary["constant_features"] = constant
    for plate, c in constant.items():
        log.warning("plate %s: %d feature(s) are constant over its sites%s%s", plate, c["n_features"],
                    f" (channels {', '.join(c['channels'])} are empty)" if c["channels"] else "",
                    "; dropped (--drop-constant)" if cfg.drop_constant else
                    "; pass --drop-constant to remove them before pycytominer")
    if cfg.drop_constant and constant:
        drop = sorted(set().union(*(c["features"] for c in constant.values())))
        wells = wells.drop(columns=drop)
        summary["dropped_constant_features"] = len(drop)
    feats = feature_columns(wells)
    wells = wells[[c for c in wells.columns if c not in feats] + feats]
    prov = {**provenance, "aggregation": f"cell->site {cfg.aggregation}, site->well {cfg.aggregation}"}
    for plate, sub in wells.groupby("Metadata_Plate", sort=True):
        info = plates[plate]
        path = write_parquet(sub.reset_index(drop=True), layout.plate_dir(info.batch, plate) / f"{plate}.parquet",
                             {**prov, "channels": info.channels, "level": "well"})
        summary["outputs"].append({"level": "well", "plate": plate, "path": str(path.relative_to(layout.root)),
                                   "rows": len(sub)})
    final = wells
    sph = cfg.sphering or {}
    n_controls = int(wells["Metadata_pert_type"].eq("negcon").sum()) if "Metadata_pert_type" in wells else 0
    if sph.get("scope") not in (None, "none") and n_controls == 0 and not sph.get("required"):
        why = ("no plate map" if platemap is None else "no Metadata_pert_type column in the plate map"
               if "Metadata_pert_type" not in wells else "no negcon wells")
        log.warning("sphering not applied: %s (set sphering.required to make this an error)", why)
        summary["sphering"] = {"applied": False, "reason": why}
    elif sph.get("scope") not in (None, "none"):
        final, fits = _sphere(cfg, wells, layout, plates)
        summary["sphering"] = {"applied": True, "scope_requested": sph["scope"], "fit_on": sph.get("fit_on", "wells"),
                               "fits": fits}
        for plate, sub in final.groupby("Metadata_Plate", sort=True):
            info = plates[plate]
            path = write_parquet(sub.reset_index(drop=True),
                                 layout.plate_dir(info.batch, plate) / f"{plate}_sphered.parquet",
                                 {**prov, "channels": info.channels, "level": "well", "sphering":
                                  [f for f in summary["sphering"]["fits"] if f["group"] in (None, plate, info.batch)]})
            summary["outputs"].append({"level": "well (sphered)", "plate": plate,
                                       "path": str(path.relative_to(layout.root)), "rows": len(sub)})
    keys = [k for k in cfg.treatment_keys if k in final.columns]
    if keys and len(keys) == len(cfg.treatment_keys):
        treat = treatment_profiles(final, keys, cfg.aggregation)
        treat = treat.drop(columns=["Metadata_Model"], errors="ignore")
        treat.insert(len(keys), "Metadata_Model", layout.model_id)
        path = write_parquet(treat, layout.treatments(), {**prov, "level": "treatment", "keys": keys,
                                                          "sphering": summary["sphering"]})
        summary["outputs"].append({"level": "treatment", "plate": "all", "path": str(path.relative_to(layout.root)),
                                   "rows": len(treat)})
    _write_skipped(skipped, layout)
    for plate, info in sorted(plates.items()):
        s = sites[sites["Metadata_Plate"] == plate]
        summary["plates"][plate] = {
            "batch": info.batch, "wells": int(s["Metadata_Well"].nunique()), "sites": int(len(s)),
            "cells": int(s["Metadata_Object_Count"].sum()),
            "sites_skipped": int(sum(1 for k in skipped if k["Metadata_Plate"] == plate
                                     and k["kind"] == "site not profiled"))}
    summary["skipped"] = sum(1 for k in skipped if k["kind"] != "plate map")
    summary["plate_map_problems"] = sum(1 for k in skipped if k["kind"] == "plate map")
    return summary


def _sphere(cfg: ProfileConfig, wells: pd.DataFrame, layout: Layout, plates: dict) -> tuple[pd.DataFrame, list]:
    sph = dict(cfg.sphering)
    if "Metadata_pert_type" not in wells:
        raise InputError(cfg.platemap or "plate map", "sphering needs Metadata_pert_type (negcon controls) in the "
                                                       "plate map; set sphering.scope: none to skip it")
    fit_on = None
    if sph.get("fit_on", "wells") in ("cells", "sites"):
        parts = []
        for r in wells[wells["Metadata_pert_type"] == "negcon"].itertuples(index=False):
            info = plates[r.Metadata_Plate]
            for well, site in info.sites:
                f = layout.site_dir(info.batch, r.Metadata_Plate, well, site) / "embeddings.parquet"
                if well == r.Metadata_Well and f.exists():
                    cells = pd.read_parquet(f)
                    if sph["fit_on"] == "sites":
                        cells = aggregate(cells[SITE_KEYS + feature_columns(cells)], SITE_KEYS, cfg.aggregation)
                    parts.append(cells)
        fit_on = pd.concat(parts, ignore_index=True) if parts else wells.iloc[:0]
    eps = sph.get("epsilon")
    kw = dict(method=sph.get("method", "zca-cor"), regularization=sph.get("regularization", DEFAULT_REGULARIZATION),
              epsilon=None if eps is None else float(eps), fit_on=fit_on)
    try:
        return sphere_profiles(wells, scope=sph["scope"], **kw)
    except ValueError as exc:
        if not sph.get("fallback"):
            raise InputError("sphering", f"{exc}") from None
        log.warning("sphering with scope %s failed (%s); falling back to scope %s", sph["scope"], exc,
                    sph["fallback"])
        try:
            out, fits = sphere_profiles(wells, scope=sph["fallback"], **kw)
        except ValueError as exc2:
            raise InputError("sphering", f"scope {sph['scope']}: {exc}; fallback scope {sph['fallback']}: {exc2} "
                                         "(add negcon wells to the plate map, or set sphering.scope: none)") from None
        for f in fits:
            f["fallback_from"] = sph["scope"]
        return out, fits


def constant_features(sites: pd.DataFrame, plates: dict[str, PlateInfo]) -> dict:
    """Per plate: the features constant over its site profiles, and the channels all of whose features are.

    Returns ``{plate: {"n_features", "features", "channels"}}`` for the plates that have any (an empty
    channel gives 256 constant features; pycytominer's spherize divides by their zero variance).
    """
    out = {}
    feats = feature_columns(sites)
    for plate, sub in sites.groupby("Metadata_Plate", sort=True):
        if len(sub) < 2:
            continue
        const = [f for f, sd in zip(feats, sub[feats].to_numpy(np.float64).std(axis=0)) if sd == 0]
        if not const:
            continue
        chans = [ch for ch in plates[plate].channels
                 if all(f in set(const) for f in feats if f.startswith(f"Microsnoop_{ch}_"))
                 and any(f.startswith(f"Microsnoop_{ch}_") for f in feats)]
        out[plate] = {"n_features": len(const), "features": const, "channels": chans}
    return out


def _write_skipped(skipped: list[dict], layout: Layout) -> None:
    df = pd.DataFrame(skipped, columns=["Metadata_Plate", "Metadata_Well", "Metadata_Site", "kind", "reason"])
    df["Metadata_Site"] = df["Metadata_Site"].astype("Int64")
    layout.root.mkdir(parents=True, exist_ok=True)
    tmp = layout.root / ".skipped.csv.tmp"
    df.sort_values(["Metadata_Plate", "Metadata_Well"], kind="stable").to_csv(tmp, index=False)
    os.replace(tmp, layout.root / "skipped.csv")
