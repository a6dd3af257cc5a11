"""The same plate on 1, 2 and 3 local worker nodes (a fixed CPU budget each): throughput and the share
of time the encoder actors are busy. Prints one JSON document.

Each run starts a fresh loopback cluster (cluster/local_cluster.py): a head for the driver and the
read tasks, plus N worker raylets with ``--cpus-per-node`` logical CPUs and one ``cropper`` and one
``encoder`` slot each, so the pools grow with the nodes. The plate is the real Transfluor row of the
CellProfiler examples (``../shared/data/pretrain``), converted to OME-Zarr once.

Note: the nodes share this machine's physical cores; where there are fewer cores than
``nodes x cpus-per-node``, the numbers show the overhead of distribution, not a speed-up.

Usage:
    python benchmarks/scaling.py [--nodes 1 2 3] [--cpus-per-node 1] [--wells 12] [--cells 8]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "cluster"))
DATA = ROOT.parent / "shared" / "data"
PATTERN = r"AS_\d+_\d+_(?P<well>[A-P]\d{2})f(?P<site>\d{2})d(?P<channel>\d)\.TIF"


def make_plate(work: Path, wells: int) -> Path:
    from microsnoop_ray.io.convert import convert_folder

    src = work / "src"
    src.mkdir()
    images = DATA / "pretrain" / "cellprofiler_examples" / "ExampleIlluminationCorrection" / "images"
    for w in range(1, wells + 1):
        for f in images.glob(f"AS_*_O{w:02d}f*d2.TIF"):
            shutil.copy(f, src / f.name)
    return convert_folder(src, PATTERN, work / "Transfluor.zarr", channel_names={"2": "GFP"}, version="0.4")


def run(nodes: int, cpus: float, plate: Path, cells: int, work: Path) -> dict:
    from local_cluster import LocalCluster

    root = Path(tempfile.mkdtemp(prefix="msr-b", dir="/tmp"))
    cluster = LocalCluster(root, head_cpus=1, dashboard=False).start_head()
    try:
        for i in range(nodes):
            cluster.add_worker(f"worker-{i}", cpus, {"cropper": 1, "encoder": 1})
        out = work / f"out-{nodes}"
        cfg = {"inputs": [str(plate)], "out": str(out), "segmenter": "classical", "max_cells_per_site": cells,
               "progress": False, "batch_size": 16, "crop_cpus": cpus / 2, "encoder_cpus": cpus / 2,
               "encoder_threads": max(1, int(cpus)), "crop_resources": {"cropper": 1},
               "encode_resources": {"encoder": 1}}
        (work / f"cfg-{nodes}.yaml").write_text(yaml.safe_dump(cfg))
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "microsnoop_ray.cli", "profile", "--config",
                            str(work / f"cfg-{nodes}.yaml"), "--address", cluster.address, "--quiet"],
                           env=cluster.env(for_jobs=False), capture_output=True, text=True, cwd=str(ROOT))
        wall = time.perf_counter() - t0
        if r.returncode not in (0, 3):
            raise RuntimeError(r.stderr[-3000:])
        s = json.loads((out / "summary.json").read_text())
        run_ = s["this_run"]
        n_cells = sum(p["cells"] for p in s["plates"].values())
        return {"worker_nodes": nodes, "cpus_per_node": cpus, "cells": n_cells,
                "sites": run_["sites_written"] + run_["sites_skipped"], "command_seconds": round(wall, 1),
                "pipeline_seconds": run_["pipeline_seconds"],
                "cells_per_second": round(n_cells / run_["pipeline_seconds"], 2),
                "encoder_actors": run_["encoder_actors"], "encoder_busy_share": run_["encoder_busy_share"]}
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--cpus-per-node", type=float, default=1)
    ap.add_argument("--wells", type=int, default=12)
    ap.add_argument("--cells", type=int, default=8, help="cells per site")
    args = ap.parse_args()
    import psutil

    work = Path(tempfile.mkdtemp(prefix="msr-scaling-"))
    try:
        plate = make_plate(work, args.wells)
        runs = [run(n, args.cpus_per_node, plate, args.cells, work) for n in args.nodes]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = runs[0]["cells_per_second"]
    for r in runs:
        r["speedup_vs_first"] = round(r["cells_per_second"] / base, 2)
    print(json.dumps({"benchmark": "scaling", "plate": f"Transfluor row O01-O{args.wells:02d} x 3 fields",
                      "physical_cores": psutil.cpu_count(logical=False), "logical_cpus": os.cpu_count(),
                      "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
