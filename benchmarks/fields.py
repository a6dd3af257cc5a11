"""Fields/s and cells/s per mode and per segmenter on this machine, as JSON.

Real fields from the package index: stardist's img2d (512 x 512 nuclei) and
scellseg's Kc167 images (400 x 400). Segmentation and embedding are timed
separately; embedding speed does not depend on the weights' values, so a
randomly initialised network is used (no trained weights are needed to time).

Usage: python benchmarks/fields.py [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from microsnoop_ray.crop.field import prepare_field
from microsnoop_ray.encode.embed import Encoder, embed
from microsnoop_ray.io.datasets import fetch_package_files
from microsnoop_ray.model import MicrosnoopUNet
from microsnoop_ray.segment import CellposeSegmenter, resolve_cellpose_weights, segment_classical


def timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def crop_and_embed(field, encoder, **kw) -> int:
    """What the crop and encode stages do to one field (prepare_field, then embed); returns the objects."""
    prep = prepare_field(field, **kw)
    embed(prep.crops, encoder=encoder)
    return len(prep.crops)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    import skimage.io
    import tifffile

    star = tifffile.imread(fetch_package_files("stardist-nuclei") / "img2d.tif")
    assets = fetch_package_files("scellseg-assets")
    kc = [skimage.io.imread(assets / "contrast_data" / "Kc167" / f"{n}_img.png") for n in ("095", "096", "097")]
    torch.manual_seed(0)
    encoder = Encoder(MicrosnoopUNet().eval(), precision="fp32")
    result = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
              "segmentation": [], "modes": []}

    s, labels = timed(lambda: segment_classical(star, diameter=16), args.repeats)
    result["segmentation"].append({"segmenter": "classical", "field": "stardist img2d 512x512",
                                   "seconds_per_field": round(s, 3), "objects": int(labels.max())})
    # Kc167: green = cells, blue is empty in these images
    s, lab_kc = timed(lambda: [segment_classical(k[..., 1], diameter=30) for k in kc], args.repeats)
    result["segmentation"].append({"segmenter": "classical", "field": "Kc167 400x400 (x3, green channel)",
                                   "seconds_per_field": round(s / 3, 3), "objects": int(sum(l.max() for l in lab_kc))})
    seg = CellposeSegmenter(resolve_cellpose_weights(assets / "pretrained_models" / "cellpose"), diameter=30)
    s, lab_cp = timed(lambda: seg([k[..., 2] for k in kc], cyto=[k[..., 1] for k in kc]), args.repeats)
    result["segmentation"].append({"segmenter": "cellpose (scellseg cyto weights)", "field": "Kc167 400x400 (x3, batched)",
                                   "seconds_per_field": round(s / 3, 3), "objects": int(sum(l.max() for l in lab_cp))})
    s, lab_cs = timed(lambda: seg([star], None), args.repeats)
    result["segmentation"].append({"segmenter": "cellpose (scellseg cyto weights)", "field": "stardist img2d 512x512",
                                   "seconds_per_field": round(s, 3), "objects": int(lab_cs[0].max())})

    field = star[None]
    for mode, kw in (("cells", {"labels": labels}), ("tiles", {}), ("rescale", {})):
        s, res = timed(lambda: crop_and_embed(field, encoder, mode=mode, **kw), args.repeats)
        result["modes"].append({"mode": mode, "field": "stardist img2d 512x512, 1 channel",
                                "objects": res, "seconds_per_field": round(s, 2),
                                "fields_per_s": round(1 / s, 3), "objects_per_s": round(res / s, 2)})
    kc_field = np.moveaxis(kc[0], -1, 0)
    s, res = timed(lambda: crop_and_embed(kc_field, encoder, mode="cells", labels=lab_cp[0]), args.repeats)
    result["modes"].append({"mode": "cells", "field": "Kc167 400x400, 3 channels (Cellpose masks)",
                            "objects": res, "seconds_per_field": round(s, 2),
                            "fields_per_s": round(1 / s, 3), "objects_per_s": round(res / s, 2)})
    # end to end cells/s with each segmenter on the stardist field (segment + crop + embed)
    for name, seg_s, lab in (("classical", result["segmentation"][0]["seconds_per_field"], labels),
                             ("cellpose", result["segmentation"][3]["seconds_per_field"], lab_cs[0])):
        s, res = timed(lambda: crop_and_embed(field, encoder, mode="cells", labels=lab), args.repeats)
        total = s + seg_s
        result.setdefault("end_to_end_cells_mode", []).append({
            "segmenter": name, "field": "stardist img2d 512x512", "cells": res,
            "seconds_per_field": round(total, 2), "cells_per_s": round(res / total, 2)})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
