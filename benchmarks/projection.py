"""A screen projected from measurements: the README's table for a 100-plate Cell Painting screen.

Nothing here is measured; every figure is computed from committed benchmark results:

* the per-GPU encoder rate (``per_gpu_planes_per_s`` of the orchestration JSON: one H100 at 224,
  torch.compile + channels_last, ``benchmarks/encoder.py --device cuda``);
* the driver's ceiling with the screen's design and its post-processing cost per site
  (``benchmarks/orchestration.py``);
* the CPU encoder rate in fp32 and in the default bf16 on this machine's 2 cores
  (``benchmarks/bf16_cpu.py``).

Usage::

    python benchmarks/projection.py benchmarks/results/orchestration_<date>.json \\
        benchmarks/results/bf16_cpu_<date>.json [--plates 100 --wells 384 --sites 9 --cells 1500 --channels 5]

Prints the Markdown table and a JSON document with every number it used.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def human(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    if seconds < 10 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds < 730 * 86400:
        return f"{seconds / 86400:.0f} days"
    return f"{seconds / (365 * 86400):.1f} years"


def product_policy() -> str:
    """The bf16_cpu.py policy that the encoder's bf16 is (``encode.precision.FP32_BLOCKS``)."""
    from bf16_cpu import POLICIES
    from microsnoop_ray.encode.precision import FP32_BLOCKS

    return next(name for name, blocks in POLICIES.items() if blocks == tuple(FP32_BLOCKS))


def project(orch: dict, bf16: dict, plates: int, wells: int, sites: int, cells: int, channels: int,
            gpus=(1, 8, 64), cpu_nodes=(1, 10, 100)) -> dict:
    n_sites = plates * wells * sites
    site_planes = cells * channels
    planes = n_sites * site_planes
    design = orch["designs"][orch["screen_design"]]
    # the driver's ceiling at this site size, from the fitted per-site, per-plane and per-second costs
    per_site = design["driver_cpu_s_per_site"] + site_planes * design["driver_cpu_s_per_plane"]
    ceiling = (1 - design["driver_cpu_s_per_wall_s"]) * site_planes / per_site
    gpu = orch["per_gpu_planes_per_s"]
    post_s = n_sites * (design["post_s_per_site"] + site_planes * design["post_s_per_plane"])
    rows = []
    for n in gpus:
        rate = min(n * gpu, ceiling)
        rows.append({"what": f"{n} GPU{'s' if n > 1 else ''}", "planes_per_s": round(rate),
                     "encode": human(planes / rate), "limit": "driver" if n * gpu > ceiling else "GPUs"})
    node_fp32 = bf16["fp32_planes_per_s"]
    node_bf16 = node_fp32 * bf16["policies"][product_policy()]["speedup_vs_fp32"]
    for n in cpu_nodes:
        rate = min(n * node_bf16, ceiling)
        rows.append({"what": f"{n} CPU node{'s' if n > 1 else ''} (2 cores, bf16)", "planes_per_s": round(rate, 1),
                     "encode": human(planes / rate), "limit": "driver" if n * node_bf16 > ceiling else "CPUs"})
    return {"screen": {"plates": plates, "wells": wells, "sites_per_well": sites, "cells_per_site": cells,
                       "channels": channels, "sites": n_sites, "planes": planes},
            "per_gpu_planes_per_s": gpu, "per_gpu_source": orch["per_gpu_source"],
            "cpu_node_planes_per_s": {"fp32": node_fp32, "bf16": round(node_bf16, 2)},
            "driver_ceiling_planes_per_s": round(ceiling), "gpus_one_driver_feeds": round(ceiling / gpu, 1),
            "post_processing_driver_s": round(post_s), "post_processing": human(post_s), "rows": rows}


def markdown(p: dict) -> str:
    lines = ["| hardware | planes/s | encoding time | limited by |", "|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['planes_per_s']:,} | {r['encode']} | {r['limit']} |" for r in p["rows"]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("orchestration", type=Path)
    ap.add_argument("bf16", type=Path)
    ap.add_argument("--plates", type=int, default=100)
    ap.add_argument("--wells", type=int, default=384)
    ap.add_argument("--sites", type=int, default=9)
    ap.add_argument("--cells", type=int, default=1500)
    ap.add_argument("--channels", type=int, default=5)
    args = ap.parse_args()
    p = project(json.loads(args.orchestration.read_text()), json.loads(args.bf16.read_text()), args.plates,
                args.wells, args.sites, args.cells, args.channels)
    print(markdown(p))
    print(json.dumps(p, indent=1))


if __name__ == "__main__":
    main()
