"""``microsnoop-ray embed`` with its defaults against ``--input-size 224`` (the published input) and
against ``--precision fp32``: wall time of the whole command (start-up, model load, compile when it
compiles, encoding, writing) on real cells, and how faithful the default arithmetic stays (median
relative error of the centred embeddings against fp32 at the same input size).

Each command runs in its own process with its own empty TorchInductor cache, as on a machine that never
compiled this network: a warm cache from an earlier run would favour whichever arithmetic ran before.
Cells: BBBC021 (``../shared/data/bbbc021_chx``, 68 px) or mlcp (``mlcp_cellcycle``, 40 px), dev sets,
drawn at random.

Prints one JSON document. Usage:
    python benchmarks/embed_cli.py [--data chx] [--cells 256] [--seed 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = {"chx": ROOT.parent / "shared" / "data" / "bbbc021_chx", "mlcp": ROOT.parent / "shared" / "data" / "mlcp_cellcycle"}
CLI = str(Path(sys.executable).with_name("microsnoop-ray"))


def run(cells: Path, out: Path, extra: list[str]) -> float:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor-"))
    t = time.perf_counter()
    subprocess.run([CLI, "embed", str(cells), "--out", str(out), "--quiet", *extra], env=env, check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=sorted(DATA), default="chx")
    ap.add_argument("--cells", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    from microsnoop_ray.evaluate.metrics import centred_relative_error
    from microsnoop_ray.pipeline.embed_job import COMPILE_FROM, COMPILE_MIN_SIDE

    tmp = Path(tempfile.mkdtemp())
    images = np.load(DATA[args.data] / "cells.npz")["images"]
    pick = np.sort(np.random.default_rng(args.seed).choice(len(images), args.cells, replace=False))
    np.save(tmp / "cells.npy", images[pick])
    runs = {}
    for name, extra in (("default", []), ("input_224", ["--input-size", "224"]), ("fp32", ["--precision", "fp32"])):
        seconds = run(tmp / "cells.npy", tmp / f"{name}.parquet", extra)
        meta = json.loads(pq.read_schema(tmp / f"{name}.parquet").metadata[b"microsnoop_ray"])
        runs[name] = {"wall_s": round(seconds, 1), "encoder_arithmetic": meta["encoder_arithmetic"],
                      "input_size": meta["input_size"]}
    a, b = (pd.read_parquet(tmp / f"{n}.parquet") for n in ("default", "fp32"))
    feats = [c for c in a if c.startswith("Microsnoop_")]
    planes = int(images.shape[1]) * args.cells
    print(json.dumps({
        "command": f"python benchmarks/embed_cli.py --data {args.data} --cells {args.cells} --seed {args.seed}",
        "date": time.strftime("%Y-%m-%d"), "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                                    capture_output=True, text=True, cwd=ROOT).stdout.strip(),
        "data": args.data, "crop_side": int(max(images.shape[-2:])),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "processor": platform.processor() or platform.machine()},
        "cells": args.cells, "planes": planes,
        "compiled": {name: planes >= COMPILE_FROM and r["input_size"] >= COMPILE_MIN_SIDE for name, r in runs.items()},
        "inductor_cache": "empty for each command", "runs": runs,
        "speedup_default_vs_fp32": round(runs["fp32"]["wall_s"] / runs["default"]["wall_s"], 2),
        "speedup_default_vs_input_224": round(runs["input_224"]["wall_s"] / runs["default"]["wall_s"], 2),
        "centred_median_relative_error": round(float(centred_relative_error(a[feats].to_numpy(),
                                                                              b[feats].to_numpy())), 4),
        "targets": {"speedup_vs_fp32": 1.4, "centred_error": 0.05, "speedup_vs_input_224": 2.0}}, indent=1))


if __name__ == "__main__":
    main()
