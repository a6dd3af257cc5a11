"""Trained weights versus the same network with random initialisation.

* kNN accuracy (leave-one-out, k = 11, Euclidean, METHOD.md vote rule) on labelled benchmark
  cells: ``mlcp_cellcycle`` (7 cell-cycle phases, Experiment_1, up to --per-class cells each) and
  ``bbbc021_chx`` (DMSO vs cycloheximide, up to --per-well cells per well).
* Masked-region reconstruction MSE on held-out images that were not in the pretraining pool
  (BBBC021 and mlcp cells of the evaluation sets, every channel; the JUMP Cell Painting field of
  the deepprofiler sdist when the weights' card shows it was not trained on), against random
  weights, the all-zero prediction and each image's visible mean.

Prints one JSON document. Usage:
    python benchmarks/weights_vs_random.py [--weights FILE] [--per-class 80] [--per-well 30]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=None, help="default: the shipped weights")
    ap.add_argument("--per-class", type=int, default=80)
    ap.add_argument("--per-well", type=int, default=30)
    args = ap.parse_args()

    from microsnoop_ray.encode.embed import Encoder, embed
    from microsnoop_ray.evaluate import knn_accuracy
    from microsnoop_ray.io.datasets import fetch_package_files
    from microsnoop_ray.io.tables import sample_per_group
    from microsnoop_ray.model import MicrosnoopUNet, load_model
    from microsnoop_ray.train.reconstruct import center_target, reconstruct

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    trained = load_model(args.weights)
    torch.manual_seed(0)
    random = MicrosnoopUNet().eval()
    models = {"trained": trained, "random_init": random}
    out = {"weights": trained.model_card.to_dict() if trained.model_card else args.weights, "sets": {}}
    out["weights"].pop("extra", None)

    sets = {}
    m = pd.read_csv(DATA / "mlcp_cellcycle" / "cells.csv")
    m = m[m["Metadata_Experiment"] == "Experiment_1"]
    idx = m.index.to_numpy()[sample_per_group(m, ["Metadata_Phase"], args.per_class)]
    sets["mlcp_cellcycle_7class"] = (np.load(DATA / "mlcp_cellcycle" / "cells.npz")["images"][idx],
                                     m.loc[idx, "Metadata_Phase"].to_numpy())
    b = pd.read_csv(DATA / "bbbc021_chx" / "cells.csv")
    idx = b.index.to_numpy()[sample_per_group(b, ["Metadata_Plate", "Metadata_Well"], args.per_well)]
    sets["bbbc021_chx_dmso_vs_drug"] = (np.load(DATA / "bbbc021_chx" / "cells.npz")["images"][idx],
                                        b.loc[idx, "Metadata_Compound"].to_numpy())
    for name, (images, labels) in sets.items():
        res = {"cells": int(len(labels))}
        for mname, model in models.items():
            t = time.perf_counter()
            feats = embed(images, encoder=Encoder(model, precision="fp32"), batch_size=48)
            res[mname] = knn_accuracy(feats, labels, k=11)
            res[mname]["seconds"] = round(time.perf_counter() - t, 1)
        out["sets"][name] = res

    # Held-out reconstruction: images that no pretraining run of this project sees (the evaluation
    # sets, every channel), plus the JUMP field when the weights were not trained on it.
    heldout = {"bbbc021_chx_crops": sets["bbbc021_chx_dmso_vs_drug"][0][:16],
               "mlcp_cellcycle_cells": sets["mlcp_cellcycle_7class"][0][:16]}
    pool = (out["weights"].get("training_data") or "") if isinstance(out["weights"], dict) else ""
    if "jump-cellpainting" not in pool:
        import tifffile
        folder = fetch_package_files("jump-field")
        heldout["jump_field"] = np.stack([tifffile.imread(p) for p in sorted(folder.rglob("*.tif*"))][:5])[None]
    for name, images in heldout.items():
        targets = np.stack([center_target(plane, 224) for image in images for plane in image])
        rec = {}
        for mname, model in models.items():
            r = reconstruct(model, targets, seed=0)
            rec[mname] = round(float(r["mse_masked"].mean()), 5)
        rec["zero_prediction"] = round(float(r["mse_masked_zero"].mean()), 5)
        rec["visible_mean_prediction"] = round(float(r["mse_masked_mean"].mean()), 5)
        out.setdefault("reconstruction_heldout", {})[name] = {"images": int(len(targets)), "masked_mse": rec}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
