"""Recipe study: short pretraining runs of recipe variants, scored on the two dev sets.

Every variant stays inside the Microsnoop method: the network, its state-dict layout and the
embedding readout (``embed`` defaults: centred zero padding to 224, 1-99 % normalisation, the
L2-normalised GAP of the deepest map) are the published ones. What varies is the pretraining:
initialisation (random or the Cellpose encoder), loss over masked patches or all pixels, mask ratio,
patch size, shallow skip connections kept/dropped/noised, input size, length, learning rate and batch.

Scores, on the dev sets only (``mlcp_cellcycle`` 7 phases of Experiment_1; ``bbbc021_chx`` DMSO vs
cycloheximide), never trained on: leave-one-out kNN (Euclidean, METHOD vote rule) at k = 5, 11 and 21,
cosine silhouette, and (``--mlp``) the z-scored MLP 5-fold. Reference rows beside the variants: random
initialisation (mean and SD over ``--seeds`` seeds), pixels-PCA, the Cellpose "cyto" encoder unchanged,
and the shipped weights.

Prints one Markdown table and writes the JSON (``--out``) after every row, so a long study can be
read while it runs. Usage::

    python benchmarks/recipe_study.py --variants all --out benchmarks/results/recipe_study_cpu.json
    python benchmarks/recipe_study.py --list
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

#: the pretraining corpus (../shared/data/README.md): every pretrain/ folder and the registry images,
#: each folder its own image type so that batches alternate between types
CORPUS = [
    {"kind": "folder", "path": str(DATA / "pretrain" / "cellprofiler_examples"), "derive_cells": True},
    {"kind": "folder", "path": str(DATA / "pretrain" / "dsb2018_stage1"), "type": "dsb2018", "rgb": "grey"},
    {"kind": "folder", "path": str(DATA / "pretrain" / "usiigaci_phase_contrast"), "type": "phase-contrast"},
    {"kind": "folder", "path": str(DATA / "pretrain" / "bccd_blood_smear"), "type": "blood-smear", "rgb": "grey"},
    {"kind": "registry", "name": "scellseg-assets", "path": "contrast_data", "exclude": "*_masks*", "rgb": "split",
     "type": "scellseg-contrast", "derive_cells": True},
    {"kind": "registry", "name": "stardist-nuclei", "path": ".", "exclude": "mask*", "type": "stardist-nuclei",
     "derive_cells": True},
]

#: the study's base recipe on 2 CPU cores (METHOD section 2, reduced in size and length)
BASE = {"input_size": 64, "batch_size": 16, "lr": 1e-3, "mask_ratio": 0.25, "patch_size": 16, "loss": "all",
        "skips": "keep", "epoch_size": 320, "nepoch": 5, "warmup": 1, "init": None}

#: variant name -> (what it changes, overrides of BASE); "cellpose" in init is resolved to the converted file
VARIANTS = {
    "base": ("paper recipe, reduced", {}),
    "masked-loss": ("MSE over the masked patches only", {"loss": "masked"}),
    "mask-0.5": ("half of the patches masked", {"mask_ratio": 0.5}),
    "patch-8": ("8 x 8 patches", {"patch_size": 8}),
    "skips-drop": ("shallow skips zeroed while pretraining", {"skips": "drop"}),
    "skips-noise": ("shallow skips noised (1 SD) while pretraining", {"skips": "noise"}),
    "skips-drop-masked": ("skips zeroed and masked-only loss", {"skips": "drop", "loss": "masked"}),
    "input-112": ("112 x 112 inputs", {"input_size": 112}),
    "lr-3e-4": ("learning rate 3e-4", {"lr": 3e-4}),
    "batch-32-sqrt": ("batch 32, lr x sqrt(2)", {"batch_size": 32, "lr": 1e-3 * 2 ** 0.5}),
    "longer": ("twice the images", {"nepoch": 12}),
    "cellpose-init": ("start from the Cellpose encoder", {"init": "cellpose"}),
    "cellpose-init-skips-drop": ("Cellpose encoder, skips zeroed", {"init": "cellpose", "skips": "drop"}),
    "cellpose-init-lr-1e-4": ("Cellpose encoder, lr 1e-4", {"init": "cellpose", "lr": 1e-4}),
}


def dev_sets(per_class: int, per_well: int) -> dict:
    """The two dev sets' cells (subsampled per class / per well, seeded) and labels."""
    from microsnoop_ray.io.tables import sample_per_group

    sets = {}
    m = pd.read_csv(DATA / "mlcp_cellcycle" / "cells.csv")
    m = m[m["Metadata_Experiment"] == "Experiment_1"]
    idx = m.index.to_numpy()[sample_per_group(m, ["Metadata_Phase"], per_class)]
    sets["mlcp 7-class"] = (np.load(DATA / "mlcp_cellcycle" / "cells.npz")["images"][idx],
                            m.loc[idx, "Metadata_Phase"].to_numpy())
    b = pd.read_csv(DATA / "bbbc021_chx" / "cells.csv")
    idx = b.index.to_numpy()[sample_per_group(b, ["Metadata_Plate", "Metadata_Well"], per_well)]
    sets["chx DMSO/drug"] = (np.load(DATA / "bbbc021_chx" / "cells.npz")["images"][idx],
                             b.loc[idx, "Metadata_Compound"].to_numpy())
    return sets


def score(features: np.ndarray, labels: np.ndarray, mlp: bool) -> dict:
    """kNN at k = 5, 11, 21, cosine silhouette and optionally the z-scored MLP of one feature matrix."""
    from microsnoop_ray.evaluate import knn_accuracy
    from microsnoop_ray.evaluate.metrics import mlp_accuracy, silhouette

    out = {f"knn{k}": knn_accuracy(features, labels, k=k)["accuracy"] for k in (5, 11, 21)}
    out["silhouette"] = float(silhouette(features, labels))
    if mlp:
        out["mlp"] = mlp_accuracy(features, labels)["accuracy"]
    return out


def network_scores(model, sets: dict, mlp: bool) -> dict:
    from microsnoop_ray.evaluate.baselines import network_features

    return {name: score(network_features(images, model), labels, mlp) for name, (images, labels) in sets.items()}


def cellpose_file() -> Path:
    """The Cellpose "cyto" weights of the scellseg sdist (the only Cellpose weights reachable offline)."""
    from microsnoop_ray.io.datasets import fetch_package_files

    return fetch_package_files("scellseg-assets") / "pretrained_models" / "cellpose"


def train_variant(name: str, overrides: dict, runs: Path, threads: int, pool) -> tuple[Path, dict]:
    from microsnoop_ray.train.config import TrainConfig
    from microsnoop_ray.train.loop import train_local

    recipe = {**BASE, **overrides}
    if recipe["init"] == "cellpose":
        recipe["init"] = f"cellpose:{cellpose_file()}"
    cfg = TrainConfig.from_mapping({**recipe, "sources": CORPUS, "name": name, "storage_path": str(runs),
                                    "threads": threads, "output": str(runs / name / "weights.pt"), "seed": 0})
    t0 = time.perf_counter()
    result = train_local(cfg, pool=pool)
    losses = [h["loss"] for h in result["history"]]
    return Path(cfg.output), {"recipe": recipe, "images_seen": result["images_seen"],
                              "train_seconds": round(time.perf_counter() - t0, 1),
                              "loss_first": losses[0], "loss_last": losses[-1]}


def table(rows: list[dict], sets: list[str], mlp: bool) -> str:
    cols = ["knn5", "knn11", "knn21", "silhouette"] + (["mlp"] if mlp else [])
    head = "| recipe | what | " + " | ".join(f"{s} {c}" for s in sets for c in cols) + " |"
    lines = [head, "|" + "---|" * (2 + len(sets) * len(cols))]
    for r in rows:
        cells = []
        for s in sets:
            for c in cols:
                v = r["scores"][s].get(c)
                sd = r.get("sd", {}).get(s, {}).get(c)
                cells.append("-" if v is None else f"{v:.3f}" + (f" ± {sd:.3f}" if sd is not None else ""))
        lines.append(f"| {r['name']} | {r['what']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="all", help="comma-separated names, or all (see --list)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", type=Path, default=None, help="print the Markdown table of a study's JSON and stop")
    ap.add_argument("--per-class", type=int, default=30, help="mlcp cells per phase")
    ap.add_argument("--per-well", type=int, default=8, help="bbbc021 cells per well")
    ap.add_argument("--seeds", type=int, default=3, help="random-init seeds")
    ap.add_argument("--epochs", type=int, default=None, help="override the base length (epochs of epoch-size)")
    ap.add_argument("--epoch-size", type=int, default=None)
    ap.add_argument("--mlp", action="store_true", help="also the z-scored MLP 5-fold (slower)")
    ap.add_argument("--no-references", action="store_true", help="skip random init, pixels-PCA, Cellpose, shipped")
    ap.add_argument("--runs", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None, help="JSON written after every row")
    args = ap.parse_args()
    if args.list:
        for k, (what, o) in VARIANTS.items():
            print(f"{k:28s} {what}: {o}")
        return
    if args.table:
        doc = json.loads(args.table.read_text())
        print(table(doc["rows"], list(doc["dev_sets"]), any("mlp" in r["scores"][s] for r in doc["rows"]
                                                             for s in r["scores"])))
        return
    import torch

    from microsnoop_ray.evaluate.baselines import pixels_pca
    from microsnoop_ray.model import MicrosnoopUNet, load_model

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    if args.epochs:
        BASE["nepoch"] = args.epochs
    if args.epoch_size:
        BASE["epoch_size"] = args.epoch_size
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; see --list")
    sets = dev_sets(args.per_class, args.per_well)
    doc = {"base_recipe": dict(BASE), "corpus": CORPUS, "dev_sets": {k: int(len(v[1])) for k, v in sets.items()},
           "threads": threads, "rows": []}

    def emit(row: dict) -> None:
        doc["rows"].append(row)
        print(json.dumps({"row": row["name"], "scores": row["scores"]}), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(doc, indent=1))

    if not args.no_references:
        per_seed = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            per_seed.append(network_scores(MicrosnoopUNet().eval(), sets, args.mlp))
        mean = {s: {c: float(np.mean([p[s][c] for p in per_seed])) for c in per_seed[0][s]} for s in sets}
        sd = {s: {c: float(np.std([p[s][c] for p in per_seed], ddof=1)) for c in per_seed[0][s]} for s in sets}
        emit({"name": "random init", "what": f"mean ± SD of {args.seeds} seeds", "scores": mean, "sd": sd,
              "per_seed": per_seed})
        emit({"name": "pixels-PCA", "what": "256 PCs of normalised pixels",
              "scores": {s: score(pixels_pca(im), lab, args.mlp) for s, (im, lab) in sets.items()}})
        emit({"name": "cellpose encoder", "what": "Cellpose cyto, unchanged",
              "scores": network_scores(load_model(f"cellpose:{cellpose_file()}"), sets, args.mlp)})
        shipped = load_model()
        emit({"name": "shipped", "what": shipped.model_card.model_id,
              "scores": network_scores(shipped, sets, args.mlp)})
    from microsnoop_ray.train.data import build_pool

    t0 = time.perf_counter()
    pool = build_pool(CORPUS)
    doc["pool"] = {"planes": len(pool), "types": pool.summary(), "seconds": round(time.perf_counter() - t0, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs or Path(tmp)
        for name in names:
            what, overrides = VARIANTS[name]
            weights, info = train_variant(name, overrides, runs, threads, pool)
            emit({"name": name, "what": what, "scores": network_scores(load_model(weights), sets, args.mlp),
                  **info})
    print(table(doc["rows"], list(sets), args.mlp))


if __name__ == "__main__":
    main()
