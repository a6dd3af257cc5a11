"""Cost as the work grows: 1, 4 and 16 copies of a real plate through ``profile``.

The plate is the real Transfluor row of the CellProfiler examples (wells O01-O08, 3 fields each,
``../shared/data/pretrain``), converted to OME-Zarr once per copy under its own plate name. The
job runs in rescale mode (one encoder input per field and channel), so the encoder's share stays
small and the numbers show what the orchestration costs per site: listing the work, the Ray Data
pipeline, one Parquet file per site, post-processing. Each size runs on the same embedded Ray.

Reported per size: wall time (and per site), time to list the work, driver peak RSS (this process
only: the driver must stay flat as the work grows), files written. Prints one JSON document.

Usage:
    python benchmarks/scale.py [--copies 1 4 16] [--mode rescale] [--weights FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline import PeakRSS  # noqa: E402  (benchmarks/pipeline.py)
TRANSFLUOR = ROOT.parent / "shared" / "data" / "pretrain" / "cellprofiler_examples" / "ExampleIlluminationCorrection" / "images"
PATTERN = r"AS_\d+_\d+_(?P<well>[A-P]\d{2})f(?P<site>\d{2})d(?P<channel>\d)\.TIF"


def make_plates(n: int, root: Path) -> list[Path]:
    from microsnoop_ray.io.convert import convert_folder

    src = root / "src"
    if not src.exists():
        src.mkdir(parents=True)
        for f in sorted(TRANSFLUOR.glob("AS_*_O0[1-8]f*d2.TIF")):
            shutil.copy(f, src / f.name)
    plates = []
    for i in range(n):
        out = root / f"Transfluor{i:02d}.zarr"
        if not out.exists():
            convert_folder(src, PATTERN, out, plate=f"Transfluor{i:02d}", channel_names={"2": "GFP"}, version="0.4")
        plates.append(out)
    return plates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--mode", choices=("rescale", "cells"), default="rescale")
    ap.add_argument("--weights", default=None)
    args = ap.parse_args()
    if not TRANSFLUOR.is_dir():
        sys.exit(f"needs {TRANSFLUOR} (../shared/data beside the repository)")

    import ray

    from microsnoop_ray.pipeline.config import ProfileConfig
    from microsnoop_ray.pipeline.plate_job import list_work, run_profile

    tmp = Path(tempfile.mkdtemp(prefix="scale-"))
    weights = args.weights
    if weights is None:
        from microsnoop_ray.model import default_weights_path
        weights = str(default_weights_path())
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        for n in args.copies:
            plates = make_plates(n, tmp / "plates")
            out = tmp / f"out-{n}"
            cfg = ProfileConfig.from_mapping({"inputs": [str(p) for p in plates], "out": str(out),
                                              "weights": weights, "crop": {"mode": args.mode},
                                              "sphering": {"scope": "none"}, "run": {"progress": False}})
            t = time.perf_counter()
            work = list_work(cfg)
            list_s = time.perf_counter() - t
            with PeakRSS(interval=0.05, children=False) as peak:
                t = time.perf_counter()
                summary = run_profile(cfg, progress_print=lambda *a: None)
                wall = time.perf_counter() - t
            sites = sum(p["sites"] for p in summary["plates"].values())
            files = sum(1 for f in out.rglob("*") if f.is_file())
            rows.append({"copies": n, "sites": sites, "items": len(work.items), "wall_s": round(wall, 2),
                         "wall_per_site_s": round(wall / max(1, sites), 3), "list_work_s": round(list_s, 3),
                         "pipeline_s": summary["this_run"].get("pipeline_seconds"),
                         "driver_peak_rss_mb": round(peak.peak / 2**20, 1), "files_written": files,
                         "skipped": summary["skipped"]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0]
    print(json.dumps({
        "machine": {"cpus": len(os.sched_getaffinity(0)), "processor": platform.processor() or platform.machine()},
        "plate": "Transfluor row O01-O08, 3 fields each (24 sites), 1 channel", "mode": args.mode,
        "runs": rows,
        "growth": {"wall_per_site_vs_smallest": [round(r["wall_per_site_s"] / base["wall_per_site_s"], 2)
                                                 for r in rows],
                   "driver_rss_vs_smallest": [round(r["driver_peak_rss_mb"] / base["driver_peak_rss_mb"], 2)
                                              for r in rows]}}, indent=1))


if __name__ == "__main__":
    main()
