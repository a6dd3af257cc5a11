"""Where the time goes on real Cell Painting fields, and what a 384-well plate costs (CPU).

On ``../shared/data/lincs_cellpainting`` (LINCS plate SQ00015198, 1080 x 1080, five channels, about
250 cells a site), every site runs through the pipeline's own stages in one process
(:class:`~microsnoop_ray.pipeline.stages.CropStage` and the encoder), timed by step: reading,
nuclei segmentation (Cellpose on DNA), cell segmentation (Cellpose on AGP + DNA), crop, cp-measure
(one compartment, and the three of ``--cell-channel``) and the encoder (at 224, the fields' input,
and at ``--input-size 96``). cp-measure and the encoder are timed on a sample of each site's cells
(``--sample``) and scaled per cell. Cells per site are compared with CellProfiler's own nuclei
(the ``locations`` files).

The projection: seconds of one core per site for each feature set, times 384 wells x 9 sites,
in core-hours (the steps run side by side on every core of a cluster, so core-hours is the unit).

Usage::

    python benchmarks/cellpainting.py --cellpose-model CYTO --out benchmarks/results/cellpainting_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "lincs_cellpainting"
SITES_PER_PLATE = 384 * 9


def site_costs(item, crop_stage, encoders: dict, sample: int, locations: Path) -> dict:
    """One site through the stages, seconds per step (cp-measure and encoder per cell, from a sample)."""
    from microsnoop_ray.features.cellprofiler import measure_cells, measure_windows
    from microsnoop_ray.io.images import read_centres
    from microsnoop_ray.pipeline.stages import _placeholder_channels, read_row
    from microsnoop_ray.segment.match import match_cells

    row = read_row({"item": item})
    image = row["image"]
    nuclei, cells, seg_seconds = crop_stage.segment([item], [image])[0]
    t0 = time.perf_counter()
    rows = crop_stage.process(row, (nuclei, cells, seg_seconds))
    crop_s = time.perf_counter() - t0
    matched = match_cells(nuclei, cells)
    profiled = int(len(np.unique(rows["Metadata_ObjectNumber"][rows["kind"] == "plane"])))
    numbers = np.unique(rows["Metadata_ObjectNumber"][rows["kind"] == "plane"])[:sample]
    names = _placeholder_channels(image.shape[0])
    t0 = time.perf_counter()
    measure_cells(image, nuclei, matched.cells, numbers, names)
    cp3 = (time.perf_counter() - t0) / max(1, len(numbers))
    objects = _objects(rows, numbers)
    t0 = time.perf_counter()
    measure_windows(image, nuclei, objects, names)
    cp1 = (time.perf_counter() - t0) / max(1, len(numbers))
    crops = _crops(rows, numbers)
    enc = {}
    for size, encoder in encoders.items():
        encoder.embed_crops(crops[:4])  # warm
        t0 = time.perf_counter()
        encoder.embed_crops(crops)
        enc[size] = (time.perf_counter() - t0) / max(1, len(numbers))
    return {"well": item.well, "site": item.site, "nuclei_found": int(nuclei.max()),
            "cells_found": int(len(np.unique(cells)) - 1), "cells_matched": len(matched.cell_of),
            "cells_profiled": profiled, "cellprofiler_nuclei": len(read_centres(locations)),
            "seconds": {"read": row["read_seconds"], **seg_seconds, "crop_and_match": crop_s,
                        "cellprofiler_nuclei_per_cell": cp1, "cellprofiler_three_compartments_per_cell": cp3,
                        **{f"encoder_{s}_per_cell": v for s, v in enc.items()}}}


def _objects(rows: dict, numbers) -> "pd.DataFrame":
    import pandas as pd

    first = [int(np.flatnonzero((rows["Metadata_ObjectNumber"] == o) & (rows["kind"] == "plane"))[0]) for o in numbers]
    cols = ["Metadata_ObjectNumber", "Metadata_Crop_Top", "Metadata_Crop_Bottom", "Metadata_Crop_Left",
            "Metadata_Crop_Right"]
    return pd.DataFrame({c: rows[c][first].astype(np.int64) for c in cols})


def _crops(rows: dict, numbers) -> list[np.ndarray]:
    from microsnoop_ray.pipeline.stages import CROP_COLUMNS, crops_of

    idx = np.flatnonzero(np.isin(rows["Metadata_ObjectNumber"], numbers) & (rows["kind"] == "plane"))
    return crops_of({k: rows[k][idx] for k in CROP_COLUMNS})


def projection(sites: list[dict]) -> dict:
    """Per-site seconds of one core for each feature set (mean cells per site), and a 384-well plate of 9
    sites in core-hours."""
    cells = float(np.mean([s["cells_profiled"] for s in sites]))
    mean = {k: float(np.mean([s["seconds"][k] for s in sites])) for k in sites[0]["seconds"]}
    base = mean["read"] + mean["nuclei_segmentation"] + mean["crop_and_match"]
    enc224 = mean["encoder_224_per_cell"] * cells  # a cell: all its channels
    out = {}
    for name, extra in {
        "microsnoop (nuclei only)": enc224,
        "microsnoop, --input-size 96": mean["encoder_96_per_cell"] * cells,
        "cellprofiler, nuclei only": mean["cellprofiler_nuclei_per_cell"] * cells,
        "cellprofiler, --cell-channel (three compartments)": mean["cell_segmentation"]
        + mean["cellprofiler_three_compartments_per_cell"] * cells,
        "microsnoop + cellprofiler, --cell-channel": mean["cell_segmentation"]
        + mean["cellprofiler_three_compartments_per_cell"] * cells + enc224,
    }.items():
        site_s = base + extra
        out[name] = {"seconds_per_site": round(site_s, 1), "plate_core_hours": round(site_s * SITES_PER_PLATE / 3600, 1)}
    return {"cells_per_site": round(cells, 1), "mean_seconds": {k: round(v, 3) for k, v in mean.items()},
            "feature_sets": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cellpose-model", required=True, help="Cellpose cyto weights file (two-channel)")
    ap.add_argument("--sample", type=int, default=24, help="cells per site timed by cp-measure and the encoder")
    ap.add_argument("--sites", type=int, default=None, help="the first N sites only")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    from microsnoop_ray.encode.embed import Encoder
    from microsnoop_ray.io.sources import list_sources
    from microsnoop_ray.pipeline.config import SegmentationConfig
    from microsnoop_ray.pipeline.stages import CropStage

    torch.set_num_threads(1)  # one core: the unit of the projection
    work = list_sources([DATA / "load_data.csv"], nuclei_channel="DNA", cell_channel="AGP")
    stage = CropStage(SegmentationConfig(segmenter="cellpose", cellpose_model=args.cellpose_model, cell_channel="AGP"))
    encoders = {224: Encoder(None, precision="auto", input_size=224), 96: Encoder(None, precision="auto", input_size=96)}
    sites = []
    for item in work.items[:args.sites]:
        loc = DATA / "locations" / item.plate / f"{item.well}-{item.site}-Nuclei.csv"
        sites.append(site_costs(item, stage, encoders, args.sample, loc))
        print(json.dumps(sites[-1]), flush=True)
    counts = np.array([[s["cells_profiled"], s["nuclei_found"], s["cellprofiler_nuclei"]] for s in sites], float)
    doc = {"date": time.strftime("%Y-%m-%d"), "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                                       capture_output=True, text=True, cwd=ROOT).stdout.strip(),
           "machine": {"cpus": len(os.sched_getaffinity(0)), "torch_threads": 1,
                       "encoder_arithmetic": encoders[224].arithmetic},
           "data": "lincs_cellpainting (SQ00015198, 1080 x 1080, 5 channels)", "segmenter": "cellpose cyto, nuclei "
           "diameter 30, cells 60 (AGP + DNA)", "sample_cells_per_site": args.sample, "sites": sites,
           "nuclei_vs_cellprofiler": {"ratio_per_site": [round(a / b, 3) for a, b in counts[:, 1:]],
                                      "profiled_vs_cellprofiler": [round(a / b, 3) for a, b in counts[:, [0, 2]]]},
           "projection": projection(sites)}
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
