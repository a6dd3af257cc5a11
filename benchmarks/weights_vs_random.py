"""Trained weights versus the same network with random initialisation.

* kNN accuracy (leave-one-out, k = 11, Euclidean, METHOD.md vote rule) on labelled benchmark
  cells: ``mlcp_cellcycle`` (7 cell-cycle phases, Experiment_1, up to --per-class cells each) and
  ``bbbc021_chx`` (DMSO vs cycloheximide, up to --per-well cells per well).
* Masked-region reconstruction MSE on held-out images that were not in the pretraining pool
  (the JUMP Cell Painting field from the deepprofiler sdist, five channels), against random
  weights and the all-zero prediction.

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

    from microsnoop_ray.encode import Encoder, embed
    from microsnoop_ray.evaluate import knn_accuracy
    from microsnoop_ray.io.registry import fetch_package_files
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
            feats = embed(images, encoder=Encoder(model), batch_size=48)
            res[mname] = knn_accuracy(feats, labels, k=11)
            res[mname]["seconds"] = round(time.perf_counter() - t, 1)
        out["sets"][name] = res

    folder = fetch_package_files("jump-field")
    import tifffile
    planes = [tifffile.imread(p) for p in sorted(folder.rglob("*.tif*"))][:5]
    targets = np.stack([center_target(p, 224) for p in planes for _ in range(1)])
    rec = {}
    for mname, model in models.items():
        r = reconstruct(model, targets, seed=0)
        rec[mname] = float(r["mse_masked"].mean())
        rec["zero_prediction"] = float(r["mse_masked_zero"].mean())
        rec["visible_mean_prediction"] = float(r["mse_masked_mean"].mean())
    out["reconstruction_heldout_jump_field"] = {"images": int(len(targets)), "masked_mse": rec}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
