"""Reduced precision on this CPU: bf16 autocast per encoder block, against fp32, on real cells.

For each policy (which of the four down blocks run under bf16 autocast; pooling, the global average
and the L2 normalisation stay fp32: ``MicrosnoopUNet.embed(x, torch.bfloat16, fp32_blocks)``; the
product's ``bf16``, and ``auto`` on such a CPU, is "fp32 first block") it reports the speed-up over
fp32 and the median relative error of the *centred* embeddings (each row minus the set's mean; ``evaluate.metrics.centred_relative_error``),
never cosine: every embedding shares one large component, so cosine reads 1.000 over a 30 % error.

Cells: every 50th BBBC021 cell of ``../shared/data/bbbc021_chx`` (a dev set), 64 cells x 3 channels,
default weights unless ``--weights``. Prints JSON; ``--out`` writes it too::

    python benchmarks/bf16_cpu.py --out benchmarks/results/bf16_cpu_<date>.json
    python benchmarks/bf16_cpu.py --dev --out ...   # and the dev-set kNN, fp32 against bf16

``--dev`` scores the weights study's dev cells (mlcp_cellcycle, bbbc021_chx) embedded by ``embed``
in fp32 and in bf16: kNN must stay within 0.01 of fp32 (issue 23).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

#: policy -> the down blocks kept in fp32 (None: all fp32); the product's bf16 is "fp32 first block"
#: (``encode.precision.FP32_BLOCKS``)
POLICIES = {"fp32": None, "bf16 every block": (), "fp32 first block": (0,), "fp32 last block": (3,),
            "fp32 first and last": (0, 3)}


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if "bf16" in f or f in ("avx512f", "amx_tile"))


def embed_policy(model, x: torch.Tensor, policy, batch: int = 32) -> tuple[np.ndarray, float]:
    """Embeddings (n, 256) under ``policy`` (:meth:`MicrosnoopUNet.embed`), and seconds."""
    out, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            h = x[i:i + batch]
            out.append(model.embed(h) if policy is None else model.embed(h, torch.bfloat16, policy))
    return torch.cat(out).numpy(), time.perf_counter() - t0


def dev_knn(weights) -> dict:
    """The weights study's dev-set measures (kNN k = 5, 11, 21, MLP, silhouette) with the encoder in fp32
    and in the product's bf16, on the same cells (benchmarks/weights_study.py's cells)."""
    from microsnoop_ray.encode.embed import Encoder, embed
    from microsnoop_ray.encode.precision import FP32_BLOCKS
    from microsnoop_ray.model import load_model
    from weights_study import dev_cells, score

    model = load_model(weights)
    cache = Path.home() / ".cache" / "microsnoop-ray" / "bf16_dev"
    cache.mkdir(parents=True, exist_ok=True)
    out = {"cells": {}}
    for name, (images, tasks) in dev_cells(100, 120).items():
        feats = {}
        for precision in ("fp32", "bf16"):  # cached per weights, cells and arithmetic: a rerun only scores
            arith = precision if precision == "fp32" else f"{precision}-fp32blocks{''.join(map(str, FP32_BLOCKS))}"
            f = cache / f"{name}-{len(images)}-{model.model_card.weights_sha256[:16]}-{arith}.npy"
            if not f.exists():
                np.save(f, embed(images, encoder=Encoder(model, precision=precision), batch_size=48))
            feats[precision] = np.load(f)
        out["cells"][name] = len(images)
        for task, y in tasks.items():
            a, b = score(feats["fp32"], y), score(feats["bf16"], y)
            out[task] = {m: {"fp32": round(a[m], 4), "bf16": round(b[m], 4), "difference": round(b[m] - a[m], 4)}
                         for m in ("knn5", "knn11", "knn21", "mlp", "silhouette")}
    out["largest_knn_difference"] = max(abs(out[t][m]["difference"]) for t in out if t != "cells"
                                        for m in ("knn5", "knn11", "knn21"))
    return out


def main() -> None:
    from microsnoop_ray.model.preprocess import pad_normalize_torch
    from microsnoop_ray.evaluate.metrics import centred_relative_error
    from microsnoop_ray.model import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dev", action="store_true", help="also the dev-set kNN in fp32 and bf16 (about 15 min)")
    args = ap.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cells = np.load(ROOT.parent / "shared" / "data" / "bbbc021_chx" / "cells.npz")["images"][::50][:64]
    x = pad_normalize_torch([p for c in cells for p in c]).contiguous(memory_format=torch.channels_last)
    model = load_model(args.weights).eval().to(memory_format=torch.channels_last)
    embed_policy(model, x[:32], POLICIES["bf16 every block"])  # warm-up of the bf16 kernels
    ref, t32 = embed_policy(model, x, POLICIES["fp32"])
    doc = {"model_id": model.model_card.model_id, "planes": len(x), "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(), "torch": torch.__version__,
           "fp32_planes_per_s": round(len(x) / t32, 2), "policies": {}}
    for name, policy in POLICIES.items():
        if name == "fp32":
            continue
        e, t = embed_policy(model, x, policy)
        doc["policies"][name] = {"speedup_vs_fp32": round(t32 / t, 2),
                                 "centred_median_relative_error": round(centred_relative_error(e, ref), 4)}
    if args.dev:
        doc["dev_sets"] = dev_knn(args.weights)
    print(json.dumps(doc, indent=1))
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
