"""Two executors of the same stages: in-process (no Ray) and Ray Data.

Both feed a :class:`~microsnoop_ray.pipeline.stages.SiteCollector`; what they produce is the
same, row for row. The in-process one serves ``fields``, notebooks and tests; the Ray one
``profile`` and the cluster jobs, with its actor pools sized from the running cluster. On Ray the
site is the unit: the encoder actors take whole crop-stage outputs (every plane of the sites a crop
call made), write each finished site where it was encoded, and send the driver one row per site.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Iterable, Iterator, Mapping

import numpy as np

from ..io.sources import WorkItem
from .config import EncodeConfig, ProfileConfig
from .stages import CropStage, EncodeStage, SiteCollector, concat_rows, needs_segmentation, read_row

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_runtime(address: str | None = None, num_cpus: int | None = None, verbose: bool = False,
                object_store_mb: int | None = None) -> Iterator[None]:
    """Ray for one command: the running one, the cluster at ``address`` (or ``$RAY_ADDRESS``), or an
    embedded local Ray started for the block and stopped after it.

    Ray's own console output stays off the terminal unless ``verbose``: its log records below ERROR
    (among them the token-authentication notice a new local Ray prints on every run; token
    authentication itself stays on, Ray's default) and the output of its workers.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet,
                 object_store_memory=object_store_mb * 2**20 if object_store_mb else None)
    try:
        yield
    finally:
        ray.shutdown()


def run_in_process(items: Iterable[WorkItem], crop: CropStage, encode: EncodeStage, collector: SiteCollector,
                   batch_size: int = 64, fields_per_batch: int = 1) -> None:
    """Read, crop, encode and collect ``items`` in this process, ``batch_size`` planes per encoder call."""
    items = list(items)
    pending: list[dict] = []
    n_pending = 0

    def flush(final: bool) -> None:
        nonlocal pending, n_pending
        if not pending:
            return
        rows = concat_rows(pending)
        n = len(rows["kind"])
        cut = n if final else n - n % batch_size
        for start in range(0, cut, batch_size):
            collector.add(encode({k: v[start:start + batch_size] for k, v in rows.items()}))
        rest = {k: v[cut:] for k, v in rows.items()}
        pending, n_pending = ([rest], n - cut) if n - cut else ([], 0)

    for start in range(0, len(items), max(1, fields_per_batch)):
        read = [read_row({"item": it}) for it in items[start:start + fields_per_batch]]
        column = np.empty(len(read), dtype=object)  # a column of items, as Ray Data hands it to the stage
        column[:] = [r["item"] for r in read]
        batch = {"item": column, "image": [r["image"] for r in read],
                 "error": np.array([r["error"] for r in read], dtype=object)}
        planes = crop(batch)
        pending.append(planes)
        n_pending += len(planes["kind"])
        if n_pending >= batch_size:
            flush(final=False)
    flush(final=True)


def _fits(total: Mapping[str, float], need: Mapping[str, float] | None) -> int | None:
    """How many actors that each need the custom resources ``need`` fit in the cluster (None: no need given)."""
    if not need:
        return None
    missing = [k for k in need if total.get(k, 0) < need[k]]
    if missing:
        raise ValueError(f"the cluster has no node with the resource(s) {missing} that the actors ask for "
                         f"(cluster resources: {sorted(k for k in total if not k.startswith('node:'))})")
    return max(1, min(int(total[k] // v) for k, v in need.items()))


#: Logical CPUs the actor pools leave for the read tasks: pools that reserve every CPU starve them.
READ_RESERVE = 0.5

#: Peak resident memory of a one-thread CPU encoder process: about 0.5 GiB plus 30 MiB per plane of
#: an encoder call (1.5 GB at 32 planes, 2.5 GB at 64, measured on BBBC021 crops in bf16).
CPU_ENCODER_BYTES = (0.5 * 2**30, 30 * 2**20)


def cpu_encoders(cpus: float, memory: float, enc: EncodeConfig, crop_cpus: float, segmenting: bool,
                 actors: int | None = None) -> tuple[int, int, float]:
    """The encoder actors of a cluster without GPUs: ``(actors, torch threads each, logical CPUs each)``.

    Pre-cropped cells and fields that need no segmentation: one single-thread actor per core,
    because there the encoder is the whole cost and it scales better across processes than across
    threads (``benchmarks/pipeline.py``: two one-thread encoder processes ran 480 BBBC021 cells in
    145 s on 2 cores, one two-thread process in 175-178 s; its threads wait for each other at every
    operator, and for any other process that takes one of them off its core).

    When the crop stage segments, Cellpose or the classical segmenter takes a large share of the
    cores: one actor per two cores with two threads each, the actors asking for half the logical
    CPUs and the crop actors for the rest (``make demo``: its Cellpose plate took 180 s with one
    one-thread encoder against 132 s with one two-thread encoder on 2 cores).

    Never more actors than the memory Ray reports holds (:data:`CPU_ENCODER_BYTES`); ``actors``
    (given, or what the custom resources allow) overrides the count. Fewer actors than cores get
    more threads each, unless ``enc.threads`` is given. Logical CPUs only place the
    actors (each runs ``threads`` torch threads whatever it asked for): the encoders ask for their
    share less room for one crop actor and the reads, so that both pools are scheduled.
    """
    threads = int(enc.threads or max(1, min(2 if segmenting else 1, int(cpus))))
    share = 0.5 if segmenting else 1.0
    budget = cpus * share - (0.0 if segmenting else crop_cpus + READ_RESERVE)  # the encoders' logical CPUs
    caps = [int(cpus // threads),
            int(memory // (CPU_ENCODER_BYTES[0] + CPU_ENCODER_BYTES[1] * enc.batch_size)) if memory else 1]
    if enc.cpus:
        caps.append(int(budget // enc.cpus))
    n = actors or max(1, min(caps))
    if not enc.threads:  # fewer actors than that (memory, a given count): more threads each, every core used
        threads = max(threads, int(cpus // n))
    each = float(enc.cpus) if enc.cpus is not None else max(0.05, min(float(threads), budget / n))
    return n, threads, each


def ray_dataset(cfg: ProfileConfig, items: list[WorkItem], sink=None, channels: dict | None = None):
    """The Ray Data pipeline over work items (resources taken from the running cluster), and the
    actor pool sizes it chose: ``(dataset, {"crop_actors": n, "encoder_actors": n})``.

    With a ``sink`` (``plate_job.SiteSink``) and the plates' ``channels``, each encoder call takes one
    whole block of the crop stage (the sites of one crop call, encoded ``batch_size`` planes at a
    time) and writes the sites complete in it; without, it takes ``batch_size`` planes of any sites."""
    import ray
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job prints its own line per plate
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 1)), float(res.get("GPU", 0))
    enc, crop, seg = cfg.encode, cfg.crop, cfg.segmentation
    use_gpu = (enc.device == "auto" or enc.device.startswith("cuda")) and gpus >= 1
    if use_gpu:
        n_enc, enc_cpus = enc.actors or _fits(res, enc.resources) or int(gpus), 0.0
    else:
        segmenting = any(needs_segmentation(crop.mode, it) for it in items)
        n_enc, threads, enc_cpus = cpu_encoders(cpus, float(res.get("memory", 0)), enc, crop.cpus, segmenting,
                                                actors=enc.actors or _fits(res, enc.resources))
        enc = dataclasses.replace(enc, threads=threads)
    spare = cpus - n_enc * enc_cpus - READ_RESERVE
    n_crop = crop.actors or _fits(res, crop.resources) or max(1, int(spare // crop.cpus))
    read_cpus = min(0.25, max(0.05, spare))
    # Capped: each read task is a worker process that starts cold, and a CPU budget alone lets a
    # cluster with spare CPUs start dozens at once, all before the first crop actor is up.
    n_reads = crop.reads_in_flight or 2 * n_crop
    log.info("pipeline: %d crop actor(s) x %.2f CPU, %d encoder actor(s) x %s, up to %d reads x %.2f CPU",
             n_crop, crop.cpus, n_enc, "1 GPU" if use_gpu else f"{enc_cpus:.2f} CPU, {enc.threads} thread(s)",
             n_reads, read_cpus)
    crop_res = {"num_cpus": crop.cpus}
    enc_gpus, seg_gpu = 1.0, False
    if use_gpu and seg.gpu_share > 0:
        # Cellpose shares each GPU with its encoder actor: the crop actors split the share between them
        per_gpu = max(1, -(-n_crop // int(gpus)))
        crop_res["num_gpus"] = seg.gpu_share / per_gpu
        enc_gpus = 1.0 - seg.gpu_share
        seg_gpu = True
    if crop.resources:
        crop_res["resources"] = dict(crop.resources)
    enc_res = {"num_gpus": enc_gpus} if use_gpu else {"num_cpus": enc_cpus}
    if enc.resources:
        enc_res["resources"] = dict(enc.resources)
    per_block = cfg.run.items_per_block or max(1, -(-len(items) // 1000))
    ds = ray.data.from_items([{"item": it} for it in items], override_num_blocks=max(1, -(-len(items) // per_block)))
    ds = ds.map(read_row, num_cpus=read_cpus, concurrency=n_reads)
    ds = ds.map_batches(CropStage, fn_constructor_kwargs={"segmentation": seg, "crop": crop, "gpu": seg_gpu,
                                                          "features": cfg.feature_sets},
                        batch_size=seg.fields_per_batch,
                        batch_format="numpy", compute=ActorPoolStrategy(min_size=1, max_size=n_crop), **crop_res)
    ds = ds.map_batches(EncodeStage, fn_constructor_kwargs={"encode": enc, "device": "cuda" if use_gpu else "cpu",
                                                            "features": cfg.feature_sets, "sink": sink,
                                                            "channels": channels},
                        batch_size=None if sink is not None else enc.batch_size, batch_format="numpy",
                        compute=ActorPoolStrategy(size=n_enc,
                                                  max_tasks_in_flight_per_actor=max(2, enc.batches_in_flight)),
                        **enc_res)
    return ds, {"crop_actors": n_crop, "encoder_actors": n_enc}


def run_on_ray(cfg: ProfileConfig, items: list[WorkItem], collector: SiteCollector, sink=None) -> dict:
    """Stream ``items`` through :func:`ray_dataset` into ``collector`` (the encoder actors write the
    sites they finish into ``sink``, when given); returns the pool sizes and ``first_result_s``, the
    seconds until the first encoder output reached the driver (the pipeline's start-up: Ray Data, the
    actors' imports and model load, the first reads and crops and batch)."""
    t0 = time.perf_counter()
    ds, pools = ray_dataset(cfg, items, sink, collector.channels if sink is not None else None)
    first = None
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        first = first if first is not None else time.perf_counter() - t0
        collector.add(batch)
    return {**pools, "first_result_s": first}
