"""Reduced precision on this CPU: bf16 autocast per encoder block, against fp32, on real cells.

For each policy (which of the four down blocks run under bf16 autocast; pooling, the global average
and the L2 normalisation stay fp32) it reports the speed-up over fp32 and the median relative error
of the *centred* embeddings (each row minus the set's mean; ``evaluate.metrics.centred_relative_error``),
never cosine: every embedding shares one large component, so cosine reads 1.000 over a 30 % error.

Cells: every 50th BBBC021 cell of ``../shared/data/bbbc021_chx`` (a dev set), 64 cells x 3 channels,
default weights unless ``--weights``. Prints JSON; ``--out`` writes it too::

    python benchmarks/bf16_cpu.py --out benchmarks/results/bf16_cpu_<date>.json
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

POLICIES = {"fp32": (False,) * 4, "bf16 every block": (True,) * 4, "fp32 first block": (False, True, True, True),
            "fp32 last block": (True, True, True, False), "fp32 first and last": (False, True, True, False)}


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if "bf16" in f or f in ("avx512f", "amx_tile"))


def embed_policy(model, x: torch.Tensor, policy, batch: int = 32) -> tuple[np.ndarray, float]:
    """Embeddings (n, 256) with the down blocks under bf16 autocast where ``policy`` says, and seconds."""
    blocks = list(model.encoder.downsample.down)
    out, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            h = x[i:i + batch]
            for k, block in enumerate(blocks):
                if k:
                    h = torch.nn.functional.max_pool2d(h, 2)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=policy[k]):
                    h = block(h)
                h = h.float()
            e = h.mean(dim=(2, 3))
            out.append(e / e.norm(dim=1, keepdim=True))
    return torch.cat(out).numpy(), time.perf_counter() - t0


def main() -> None:
    from microsnoop_ray.encode.preprocess import pad_normalize_torch
    from microsnoop_ray.evaluate.metrics import centred_relative_error
    from microsnoop_ray.model import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None)
    ap.add_argument("--out", type=Path, default=None)
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
    print(json.dumps(doc, indent=1))
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
