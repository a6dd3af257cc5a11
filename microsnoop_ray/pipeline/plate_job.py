"""The plate job: list the work, stream it through Ray Data, write the sites, post-process.

Sites are written atomically, one file each, as soon as they are complete: a rerun lists what
exists and sends only the missing sites through the pipeline. The post-processing
(:mod:`~microsnoop_ray.pipeline.postprocess`) is a pure function of the site files and is redone
on every run. Output layout: :mod:`~microsnoop_ray.pipeline.layout`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path

import pandas as pd

from ..config import save_config
from ..errors import InputError
from ..io.atomic import write_json
from ..io.sources import SiteKey, Work, WorkItem
from ..io.tables import read_platemap
from .config import ProfileConfig
from .executors import run_on_ray
from .layout import Layout, site_table
from .postprocess import postprocess
from .progress import PlateProgress, ray_output_to
from .stages import SiteCollector

log = logging.getLogger(__name__)

__all__ = ["ProfileConfig", "run_profile", "list_work", "prepare_illumination", "run_provenance", "segmenter_used"]


def list_work(cfg: ProfileConfig) -> Work:
    """The work items, plates and input problems of ``cfg.inputs`` (:func:`~microsnoop_ray.io.sources.list_sources`)."""
    work = cfg.work()
    loose = [it for it in work.items if it.well is None]
    if loose:  # wells are what the plate profiles are made of
        raise InputError(loose[0].where, "an image file without a plate and well: `profile` takes OME-Zarr plates, "
                                         "image tables (Path_<Channel> columns, load_data.csv) and cell arrays; "
                                         "profile loose fields with `microsnoop-ray fields`")
    return work


def with_input_size(cfg: ProfileConfig, items: list[WorkItem]) -> ProfileConfig:
    """``cfg`` with ``encode.input_size`` resolved to a number for these items: ``auto`` is the rule of
    :func:`~microsnoop_ray.model.contract.input_size_for` for pre-cropped cells (one size for the run:
    their largest side), and 224 as soon as any item is a field (field crops, tiles and rescaled fields
    are 224 windows of varying content; the study covered pre-cropped cells only)."""
    from ..model.contract import INPUT_SIZE, input_size_for

    asked = cfg.encode.input_size
    if str(asked).strip().lower() == "auto":
        sides = [it.crop_side() for it in items] if items and all(it.precropped for it in items) else []
        size = input_size_for(max(sides)) if sides else INPUT_SIZE
    else:
        size = input_size_for(INPUT_SIZE, asked)
    return dataclasses.replace(cfg, encode=dataclasses.replace(cfg.encode, input_size=str(size)))


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


def segmenter_used(cfg: ProfileConfig, items: list[WorkItem], description: str | None = None) -> str:
    """How the objects of ``items`` were found, in words (``description``: that of a segmenter already
    made, so that its weights are not resolved a second time)."""
    from ..segment import describe_segmenter

    seg, mode = cfg.segmentation, cfg.crop.mode
    fields = [it for it in items if not it.precropped]
    supplied = {it.supplied_objects for it in fields}
    used = []
    if fields:
        if mode != "cells":
            used.append(f"none ({mode} mode)")
        elif "labels" in supplied:
            used.append("supplied label images")
        elif "centres" in supplied:
            used.append("supplied object centres")
        else:
            used.append(description or describe_segmenter(seg.segmenter, seg.cellpose_model, seg.diameter))
    if len(fields) < len(items):
        used.append("none (pre-cropped cell arrays)")
    return "; ".join(used)


def run_provenance(cfg: ProfileConfig, items: list[WorkItem], segmenter_description: str | None = None) -> dict:
    """What a reader of any output file needs to know how it was made (stored in every Parquet file)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("microsnoop-ray")
    except PackageNotFoundError:  # a source checkout that was never installed
        from .. import __version__ as pkg
    files = [_file_stamp(Path(p)) for p in cfg.inputs]
    if cfg.cell_table:
        files.append(_file_stamp(Path(cfg.cell_table)))
    pm = None
    if cfg.platemap:
        pm = {"path": str(Path(cfg.platemap).resolve()),
              "sha256": hashlib.sha256(Path(cfg.platemap).read_bytes()).hexdigest()}
    return {"package": f"microsnoop-ray {pkg}", "segmenter_used": segmenter_used(cfg, items, segmenter_description),
            "inputs": files,
            "platemap": pm, "config": cfg.to_dict()}


def well_annotations(platemap: pd.DataFrame | None, plate: str, well: str, present) -> dict:
    """The plate-map columns of one well (not those already in ``present``), for per-cell rows."""
    if platemap is None:
        return {}
    rows = platemap[platemap["Metadata_Well"] == well]
    if "Metadata_Plate" in platemap:
        rows = rows[rows["Metadata_Plate"] == plate]
    own = {"Metadata_Plate", "Metadata_Well", "Metadata_Batch", "Metadata_Row", "Metadata_Column", "Metadata_Site",
           "Metadata_FileName", "Metadata_Model"}  # the site's own columns win over a plate map's
    cols = [c for c in platemap.columns if c not in own and c not in set(present)]
    if rows.empty:
        return {c: None for c in cols}
    r = rows.iloc[0]
    return {c: (None if pd.isna(r[c]) else r[c]) for c in cols}


def prepare_illumination(cfg: ProfileConfig, work: Work, layout: Layout, progress_print=print,
                         ) -> tuple[list[WorkItem], dict | None]:
    """Point every field at its plate's illumination functions, computing them first for ``illum: compute``.

    ``compute`` reads every field of a plate once (a running sum per channel) and writes
    ``<out>/illum/<plate>/<plate>_Illum<Channel>.npy`` with a PNG each; a rerun reuses the files.
    A folder holds such files (Cell Painting Gallery layout); a missing one skips the plate's sites
    with a reason naming the file. Returns the items (with ``illum`` set) and what was done, for the
    provenance (None: no correction).
    """
    from ..io.illum import IllumAccumulator, illum_paths, save_functions

    if cfg.illum in (None, "", "none"):
        return work.items, None
    if any(it.precropped for it in work.items):
        raise InputError("--illum", "illumination correction applies to whole fields, not to pre-cropped cell arrays")
    compute = cfg.illum == "compute"
    folder = layout.root / "illum" if compute else Path(cfg.illum)
    if not compute and not folder.is_dir():
        raise InputError(folder, "illumination folder does not exist (expected <folder>/<plate>/<plate>_Illum<Channel>.npy)")
    note = {"mode": "compute" if compute else "folder", "folder": str(folder.resolve()), "plates": {}}
    items = list(work.items)
    for plate, info in sorted(work.plates.items()):
        paths = illum_paths(folder, plate, info.channels)
        mine = [i for i, it in enumerate(items) if it.plate == plate]
        fields = None
        if compute and not all(p.exists() for p in paths):
            t0 = time.perf_counter()
            acc, refused = IllumAccumulator(), 0
            for i in mine:
                try:
                    acc.add(items[i].load())
                except InputError:
                    refused += 1  # the site itself is skipped with its reason by the pipeline
            save_functions(folder, plate, info.channels, acc.functions())
            fields = acc.n
            progress_print(f"  {plate}: illumination functions from {acc.n} field(s) ({refused} unreadable or "
                           f"of another shape) in {time.perf_counter() - t0:.1f} s -> {paths[0].parent}")
        note["plates"][plate] = {"files": [str(p) for p in paths], **({"fields": fields} if fields else {})}
        for i in mine:
            items[i] = dataclasses.replace(items[i], illum=tuple(str(p) for p in paths))
    return items, note


# --------------------------------------------------------------------------- running it

class SiteSink:
    """Writes a finished site: its cells with their plate-map annotations and provenance, or the reason
    it was skipped. It travels to the encoder actors, which write the sites they finish (so it holds
    only small, picklable things: per plate its batch and channels, not its site list).

    A site already written by this run is not written again: a task retried after a worker died
    finds it there (the run cleared the notes of every site it does before it started).
    """

    def __init__(self, layout: Layout, plates: dict, platemap: pd.DataFrame | None, provenance: dict,
                 files: dict):
        self.layout, self.platemap, self.provenance, self.files = layout, platemap, provenance, files
        self.batches = {p: info.batch for p, info in plates.items()}
        self.channels = {p: list(info.channels) for p, info in plates.items()}

    def site(self, key: SiteKey, cells: pd.DataFrame, dropped: list, rejected: int, arithmetic: str) -> None:
        batch = self.batches[key.plate]
        if self.layout.site_done(batch, key):
            return
        table = site_table(key, cells, self.layout.model_id, batch, self.files.get(key),
                           well_annotations(self.platemap, key.plate, key.well, cells.columns))
        self.layout.write_site(batch, key, table, dropped, {**self.provenance, "channels": self.channels[key.plate],
                                                           "encoder_arithmetic": arithmetic})

    def skip(self, key: SiteKey, reason: str) -> None:
        batch = self.batches[key.plate]
        if not self.layout.site_done(batch, key):
            self.layout.write_skip(batch, key, reason)


def run_sites(cfg: ProfileConfig, todo: list, sink: SiteSink, log_file: Path | None) -> dict:
    """Run the work items ``todo`` through the Ray pipeline into ``sink``, with per-plate progress;
    returns the run's counts (time, encoder busy share, duplicates ignored)."""
    per_plate: dict[str, int] = {}
    for key in {it.key for it in todo}:
        per_plate[key.plate] = per_plate.get(key.plate, 0) + 1
    progress: PlateProgress | None = None

    def on_site(key: SiteKey, n_cells: int | None) -> None:
        if progress is not None:
            progress.site_done(key, n_cells)

    collector = SiteCollector(sink.site, sink.skip, sink.channels, on_site, cfg.feature_sets)
    t_run = time.perf_counter()
    with ray_output_to(log_file) as terminal:
        progress = PlateProgress(per_plate, stream=terminal) if cfg.run.progress else None
        try:
            pools = run_on_ray(cfg, todo, collector, sink if cfg.run.site_writes == "workers" else None)
        except Exception:  # a bug, or the cluster failing: the traceback goes to the log and up
            log.exception("profile failed after %d of %d site(s); finished sites stay written, a rerun of "
                          "the same command does the rest", collector.sites_done, sum(per_plate.values()))
            raise
        finally:
            if progress is not None:
                progress.close()
    if collector.incomplete():
        raise RuntimeError(f"{len(collector.incomplete())} site(s) did not receive all their planes: "
                           f"{collector.incomplete()[:5]}")
    seconds = time.perf_counter() - t_run
    return {"sites_written": collector.sites_written, "sites_skipped": collector.sites_skipped,
            "duplicate_rows_ignored": collector.duplicates, "pipeline_seconds": round(seconds, 2),
            "encoder_busy_seconds": round(collector.encode_seconds, 2), "encoder_actors": pools["encoder_actors"],
            "encoder_arithmetic": sorted(collector.arithmetic),
            "encoder_busy_share": round(collector.encode_seconds / max(1e-9, pools["encoder_actors"] * seconds), 3),
            "first_result_s": None if pools["first_result_s"] is None else round(pools["first_result_s"], 2),
            "step_seconds": step_seconds(collector.step_seconds, collector.sites_done)}


def step_seconds(totals, sites: int) -> dict:
    """Where the time goes: worker seconds per step (:data:`~.stages.STEPS`), in all and per site
    (steps run side by side on many workers, so they add up to more than the wall time)."""
    from .stages import STEPS

    return {"sites": int(sites), "total": {k: round(float(v), 2) for k, v in zip(STEPS, totals)},
            "per_site": {k: round(float(v) / max(1, sites), 3) for k, v in zip(STEPS, totals)}}


def run_profile(cfg: ProfileConfig, progress_print=print, log_file: str | Path | None = "default") -> dict:
    """Profile the plates of ``cfg`` on the current Ray cluster (``ray.init`` must have run).

    Parameters
    ----------
    progress_print : callable
        Where the job's lines go (``print``; a no-op for ``--quiet``).
    log_file : path, "default" or None
        Where Ray's own log records and warnings go while the job runs (``"default"``:
        ``<out>/logs/profile.log``; None: leave them on the terminal, ``--verbose``).

    Returns
    -------
    dict, the summary written to ``summary.json``.
    """
    from ..model.load import load_model

    t0 = time.perf_counter()
    card = load_model(cfg.encode.weights).model_card
    layout = Layout(cfg.out, card.model_id)
    if log_file == "default":
        log_file = layout.root / "logs" / "profile.log"
    # plan: what there is, what is already done
    work = list_work(cfg)
    cfg = with_input_size(cfg, work.items)
    items, illumination = prepare_illumination(cfg, work, layout, progress_print)
    save_config({**cfg.to_dict(), "model_id": card.model_id}, layout.root / "run_config.yaml")
    plates = work.plates
    todo = [it for it in items if not layout.site_done(plates[it.plate].batch, it.key, cfg.run.retry_skipped)]
    for it in todo:  # a retried skip is replaced, never kept beside its new result
        layout.clear_notes(plates[it.plate].batch, it.key)
    n_todo, n_total = len({it.key for it in todo}), sum(len(p.sites) for p in plates.values())
    progress_print(f"microsnoop-ray profile: {len(plates)} plate(s), {len(items)} work item(s); "
                   f"{n_todo} site(s) to do, {n_total - n_todo} already done"
                   + (f"; Ray's messages go to {log_file}" if log_file and todo else ""))
    platemap = read_platemap(cfg.platemap) if cfg.platemap else None
    provenance = {"model_card": card.to_dict(int(cfg.encode.input_size)), "mode": cfg.crop.mode,
                  "segmenter": cfg.segmentation.segmenter, "normalization": cfg.encode.normalization,
                  "input_size": int(cfg.encode.input_size),
                  "rescale_constant": cfg.crop.rescale_constant, "border": cfg.crop.border,
                  "max_cells_per_site": cfg.crop.max_cells_per_site, "features": list(cfg.feature_sets),
                  **run_provenance(cfg, items),
                  "illumination": illumination}
    sink = SiteSink(layout, plates, platemap, provenance, {it.key: it.file_name for it in items
                                                            if it.file_name is not None})
    counts = run_sites(cfg, todo, sink, log_file) if todo else {"sites_written": 0, "sites_skipped": 0}
    # post-process: wells, sphering, treatments, the summary
    summary = postprocess(cfg, plates, layout, work.problems, provenance, platemap)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["this_run"] = counts
    if log_file and todo:
        summary["log_file"] = str(log_file)
    write_json(summary, layout.root / "summary.json")
    for plate, s in summary["plates"].items():
        progress_print(f"  {plate}: {s['wells']} wells, {s['sites']} sites, {s['cells']} cells, "
                       f"{s['sites_skipped']} site(s) skipped")
    return summary
