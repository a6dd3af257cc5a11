"""Pipeline overhead: cells/s through the Ray Data plate pipeline versus the bare encoder loop
on the same pre-cropped cells in the same run, and peak memory.

Pre-cropped BBBC021 cells (``../shared/data/bbbc021_chx``) need no segmentation, so the
encoder is the bottleneck and the ratio measures what the pipeline costs around it (reads,
padding/normalisation in the crop actors, object store transfers, writing Parquet).

Two bare loops, both timed after the model is loaded and warm: ``bare_encoder`` is one process
with a torch thread per core (what ``embed`` runs), ``bare_per_core`` one single-thread process
per core on its share of the cells, started together: the same layout as the pipeline's CPU
encoder actors, so ``ratio_to_bare_per_core`` is the pipeline's own cost alone.

Prints one JSON document. Usage:
    python benchmarks/pipeline.py [--cells 240] [--batch-size 64] [--weights FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bbbc021_chx"


class PeakRSS:
    """Samples the summed RSS of this process and (``children``) all its descendants, Ray workers included."""

    def __init__(self, interval: float = 1.0, children: bool = True):
        self.interval, self.peak, self.children, self._stop = interval, 0, children, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me] + (me.children(recursive=True) if self.children else []):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=240)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--repeats", type=int, default=1, help="rounds of the three measurements (the machine's "
                    "speed drifts by up to 20 %% between runs minutes apart: the medians are reported)")
    args = ap.parse_args()

    import torch

    tmp = Path(tempfile.mkdtemp())
    weights = args.weights
    if weights is None:
        from microsnoop_ray.model import save_random_init
        from microsnoop_ray.model import default_weights_path
        weights = str(default_weights_path() or save_random_init(tmp / "w.pt"))
    images = np.load(DATA / "cells.npz")["images"]
    meta = pd.read_csv(DATA / "cells.csv")
    pick = np.sort(np.random.default_rng(0).choice(len(meta), args.cells, replace=False))
    np.savez(tmp / "cells.npz", images=images[pick])
    meta.iloc[pick].to_csv(tmp / "cells.csv", index=False)
    crops = images[pick]
    handoff = handoff_bytes(crops, meta.iloc[pick])

    ncores = len(os.sched_getaffinity(0))
    rounds = [one_round(args, tmp, weights, crops) for _ in range(args.repeats)]
    resources = [r.pop("ray_resources") for r in rounds][0]

    def med(key: str) -> float:
        return round(float(np.median([r[key] for r in rounds])), 3)

    print(json.dumps({
        "machine": {"cpus": ncores, "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "ray_resources": resources},
        "cells": args.cells, "channels": int(crops.shape[1]), "batch_size": args.batch_size,
        "repeats": args.repeats, "order_in_each_round": ["bare_encoder", "bare_per_core", "pipeline"],
        "rounds": rounds,
        "median_ratio_pipeline_to_bare": med("ratio_pipeline_to_bare"), "target": 0.9,
        "median_ratio_to_bare_per_core": med("ratio_to_bare_per_core"),
        "object_store_bytes_per_plane": handoff}, indent=1))


def one_round(args, tmp: Path, weights: str, crops: np.ndarray) -> dict:
    """The bare loop, the per-core bare loops and the pipeline, one after the other, on the same cells."""
    import ray

    from microsnoop_ray.encode.embed import embed
    from microsnoop_ray.pipeline.plate_job import ProfileConfig, run_profile

    ncores = len(os.sched_getaffinity(0))
    enc = warm_encoder(weights, ncores, crops, args.batch_size)
    with PeakRSS() as bare_mem:
        t = time.perf_counter()
        embed(crops, encoder=enc, batch_size=args.batch_size)
        bare_s = time.perf_counter() - t
    del enc
    per_core_s = bare_per_core(crops, weights, ncores, args.batch_size)

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    out = Path(tempfile.mkdtemp(dir=tmp))
    cfg = ProfileConfig.from_mapping({"inputs": [str(tmp / "cells.npz")], "out": str(out),
                                      "weights": weights, "channel_names": ["DNA", "ch1", "ch2"],
                                      "batch_size": args.batch_size, "cells_chunk": 64, "progress": False,
                                      "sphering": {"scope": "none"}})
    with PeakRSS() as pipe_mem:
        t = time.perf_counter()
        summary = run_profile(cfg, progress_print=lambda *a: None)
        pipe_s = time.perf_counter() - t
    resources = ray.cluster_resources()
    ray.shutdown()
    n = sum(p["cells"] for p in summary["plates"].values())
    assert n == args.cells, (n, args.cells)
    return {"ray_resources": {k: v for k, v in resources.items() if k in ("CPU", "GPU")},
            "bare_encoder": {"processes": 1, "threads": ncores, "seconds": round(bare_s, 2),
                             "cells_per_s": round(args.cells / bare_s, 2), "peak_rss_mb": round(bare_mem.peak / 2**20)},
            "bare_per_core": {"processes": ncores, "threads_each": 1, "seconds": round(per_core_s, 2),
                              "cells_per_s": round(args.cells / per_core_s, 2)},
            "pipeline": {"seconds": round(pipe_s, 2), "cells_per_s": round(n / pipe_s, 2),
                         "peak_rss_mb_all_processes": round(pipe_mem.peak / 2**20),
                         "includes": "Ray Data start-up, reads, crop actors, encoder actors start (model load, "
                                     "first batch), Parquet writes, aggregation"},
            "this_run": summary["this_run"],
            "ratio_pipeline_to_bare": round(bare_s / pipe_s, 3),
            "ratio_to_bare_per_core": round(per_core_s / pipe_s, 3)}


def warm_encoder(weights: str, threads: int, crops: np.ndarray, batch_size: int):
    """An encoder on ``threads`` torch threads that has run once (the timed loops exclude the first call)."""
    import torch

    from microsnoop_ray.encode.embed import Encoder, embed
    torch.set_num_threads(threads)
    enc = Encoder(weights)
    embed(crops[:8], encoder=enc, batch_size=batch_size)
    return enc


def _per_core_worker(crops, weights, batch_size, barrier, out):
    from microsnoop_ray.encode.embed import embed
    enc = warm_encoder(weights, 1, crops, batch_size)
    barrier.wait()
    embed(crops, encoder=enc, batch_size=batch_size)
    out.put(time.perf_counter())


def bare_per_core(crops: np.ndarray, weights: str, n: int, batch_size: int) -> float:
    """Seconds from a common start until ``n`` one-thread encoder processes, each on its ``1/n`` of
    ``crops``, have all finished."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n + 1), ctx.Queue()
    procs = [ctx.Process(target=_per_core_worker, args=(part, weights, batch_size, barrier, out))
             for part in np.array_split(crops, n)]
    for p in procs:
        p.start()
    barrier.wait()
    t = time.perf_counter()
    ends = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return max(ends) - t


def handoff_bytes(crops: np.ndarray, meta: pd.DataFrame) -> dict:
    """Bytes per plane that the crop actors hand to the encoder actors, measured on these cells by the
    crop stage itself, against the 224 x 224 float32 planes the pipeline shipped before."""
    from microsnoop_ray.io.sources import CellChunk
    from microsnoop_ray.pipeline.stages import PLANE, CropStage

    path = Path(tempfile.mkdtemp()) / "crops.npy"
    np.save(path, crops)
    item = CellChunk("P", "A01", 1, crops.shape[1], path=str(path), rows=tuple(range(len(crops))),
                     object_numbers=tuple(range(1, len(crops) + 1)), site_planes=len(crops) * crops.shape[1])
    rows = CropStage().process({"item": item, "image": crops, "error": ""})
    real = rows["kind"] == PLANE
    after = sum(len(b) for b in rows["crop"][real]) / real.sum()
    before = 224 * 224 * 4
    return {"before_224_float32": before, "after_native_crops": round(after, 1), "reduction": round(before / after, 1),
            "crop_dtype": sorted(set(rows["crop_dtype"][real]))}


if __name__ == "__main__":
    main()
