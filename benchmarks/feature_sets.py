"""What each feature set is worth on the dev sets: CellProfiler alone, the default encoder alone, both.

The cells, tasks and measures are those of ``benchmarks/weights_study.py`` (the same cells, so the
encoder row equals the study's row for the default weights): mlcp 7-class and 5-class, chx DMSO vs
drug and dose; kNN at k = 5, 11, 21, the z-scored MLP (5-fold) and the cosine silhouette.

* ``cellprofiler``: cp-measure on each crop's object (the foreground object nearest the crop centre,
  thresholded on the DNA channel for mlcp and on all channels for chx, as ``embed --features
  cellprofiler`` does without masks); NaN imputed with the column median, constant columns dropped,
  z-scored (CellProfiler profiles are normalised before any comparison).
* ``microsnoop``: the default encoder's embeddings as ``embed`` writes them.
* ``both``: each block z-scored column by column, then divided by the square root of its number of
  columns, so that each block carries the same total variance (equal weight per block), and
  concatenated.

Per-cell cost: seconds per cell of each extractor on this machine (encoder fp32 on every core,
cp-measure single-threaded), measured on the cells of the run. Embeddings and measurements are
cached (``--cache``). Usage::

    python benchmarks/feature_sets.py --out benchmarks/results/feature_sets_cpu_<date>.json
    python benchmarks/feature_sets.py --table benchmarks/results/feature_sets_cpu_<date>.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from weights_study import KS, MEASURES, TASKS, dev_cells, score  # noqa: E402

CHANNELS = {"mlcp": (["Brightfield", "DNA", "Darkfield"], [1]), "chx": (["DNA", "ch1", "ch2"], None)}


def zscore_block(F: np.ndarray) -> np.ndarray:
    """Columns z-scored (constant ones dropped), then divided by sqrt(columns): unit total variance per column
    on average, so two blocks concatenated weigh the same whatever their widths."""
    from microsnoop_ray.evaluate.baselines import standardize

    Z, _ = standardize(F)
    return Z / np.sqrt(Z.shape[1])


def cellprofiler_features(images: np.ndarray, channels, mask_channels, cache: Path, key: str) -> tuple[np.ndarray, float]:
    from microsnoop_ray.features.cellprofiler import measure_object, nearest_object_masks

    f = cache / f"cellprofiler-{key}.npz"
    if f.exists():
        d = np.load(f)
        return d["values"], float(d["seconds_per_cell"])
    t0 = time.perf_counter()
    masks = nearest_object_masks(images, mask_channels)
    values = np.stack([measure_object(im, m, channels) for im, m in zip(images, masks)])
    spc = (time.perf_counter() - t0) / len(images)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(f, values=values, seconds_per_cell=spc)
    return values, spc


def encoder_features(images: np.ndarray, weights, cache: Path, key: str) -> tuple[np.ndarray, float, str]:
    from microsnoop_ray.evaluate.baselines import network_features
    from microsnoop_ray.model import load_model

    model = load_model(weights)
    card = model.model_card
    f = cache / f"{key}-{card.weights_sha256[:16]}.npy"  # the weights study's cache file of these weights
    feats = np.load(f) if f.exists() else None
    sample = images[:64]
    t0 = time.perf_counter()
    network_features(sample, model)  # timed on a sample, whether or not the set is cached
    spc = (time.perf_counter() - t0) / len(sample)
    if feats is None:
        feats = network_features(images, model)
        cache.mkdir(parents=True, exist_ok=True)
        np.save(f, feats)
    return feats, spc, card.model_id


def run(args) -> dict:
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    sets = dev_cells(args.per_class, args.per_dose)
    doc = {"cells": {s: int(len(im)) for s, (im, _) in sets.items()}, "rows": {}, "seconds_per_cell": {}}
    blocks = {}
    for s, (images, tasks) in sets.items():
        key = f"{s}-{hashlib.sha256(images.tobytes()).hexdigest()[:12]}"
        names, mask_ch = CHANNELS[s]
        cp, cp_spc = cellprofiler_features(images, names, mask_ch, args.cache, key)
        emb, enc_spc, model_id = encoder_features(images, args.weights, args.cache, key)
        doc["model_id"] = model_id
        doc["seconds_per_cell"][s] = {"cellprofiler": round(cp_spc, 4), "microsnoop": round(enc_spc, 4),
                                      "channels": images.shape[1], "size": list(images.shape[-2:])}
        from microsnoop_ray.evaluate.baselines import standardize

        blocks[s] = {"cellprofiler": standardize(cp)[0], "microsnoop": emb,
                     "both": np.concatenate([zscore_block(cp), zscore_block(emb)], axis=1)}
        doc["nan_fraction_cellprofiler"] = doc.get("nan_fraction_cellprofiler", {}) | {
            s: round(float(np.isnan(cp).mean()), 4)}
        for name, F in blocks[s].items():
            row = doc["rows"].setdefault(name, {})
            for task, y in tasks.items():
                row[task] = score(F, y)
            print(json.dumps({"features": name, "set": s, "scores": {t: row[t] for t in tasks}}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1))
    return doc


def table(doc: dict) -> str:
    lines = ["| features | " + " | ".join(f"{t} kNN 5/11/21 | {t} MLP | {t} silhouette" for t in TASKS)
             + " | mlcp mean | chx mean |", "|---|" + "---|" * (3 * len(TASKS) + 2)]
    for name, r in doc["rows"].items():
        cells = []
        for t in TASKS:
            cells += ["/".join(f"{r[t][f'knn{k}']:.3f}" for k in KS), f"{r[t]['mlp']:.3f} ± {r[t]['mlp_sd']:.3f}",
                      f"{r[t]['silhouette']:.3f}"]
        means = [np.mean([r[t][m] for t, d in TASKS.items() if d == dev for m in MEASURES]) for dev in ("mlcp", "chx")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {means[0]:.3f} | {means[1]:.3f} |")
    lines += ["", "| per-cell cost on this machine | " + " | ".join(doc["seconds_per_cell"]) + " |",
              "|---|" + "---|" * len(doc["seconds_per_cell"])]
    for what in ("microsnoop", "cellprofiler"):
        lines.append(f"| {what} | " + " | ".join(
            f"{v[what] * 1000:.0f} ms ({v['channels']} ch, {v['size'][0]} px)" for v in doc["seconds_per_cell"].values())
            + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="encoder weights (default: the shipped default)")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--per-dose", type=int, default=120)
    ap.add_argument("--cache", type=Path, default=None, help="default: $MICROSNOOP_CACHE/weights_study")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None, help="print the table of a JSON and stop")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    if args.cache is None:
        from microsnoop_ray.io.cache import cache_dir
        args.cache = cache_dir() / "weights_study"
    print(table(run(args)))


if __name__ == "__main__":
    main()
