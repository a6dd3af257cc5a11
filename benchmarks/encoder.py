"""Encoder throughput on this machine, against its measured matrix-multiply peak.

Prints one JSON document: for input sizes 64, 112 and 224 and for each variant
(eager, channels_last, torch.compile + channels_last), images/s and achieved
GFLOP/s (FLOPs counted by torch's FlopCounterMode on the real encoder), and the
fraction of the float32 matmul peak measured in the same run.

On a GPU (``--device cuda``) the variants also include fp16 autocast, the
matmul peak is measured in the same precision as each variant, and
``end_to_end`` times :func:`microsnoop_ray.encode.embed` (padding and
percentile normalisation on the CPU, then the encoder) on 64 x 64 windows of
a real CellProfiler example field: what one encoder actor of the pipeline can do.

Usage: python benchmarks/encoder.py [--sizes 64,112,224] [--seconds 8] [--device cuda] [--batch 256]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from microsnoop_ray.model import MicrosnoopUNet

BATCH = {64: 64, 112: 32, 224: 16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(seconds: float, n: int = 2048, device: torch.device = torch.device("cpu"),
                dtype: torch.dtype = torch.float32) -> float:
    n = n if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def encoder_flops(model, size: int) -> float:
    x = torch.zeros(1, 1, size, size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.embed(x)
    return counter.get_total_flops()


def throughput(fn, x, seconds: float) -> float:
    with torch.inference_mode():
        fn(x)
        fn(x)  # warm-up (and compilation)
        _sync(x.device)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn(x)
            n += len(x)
        _sync(x.device)
    return n / (time.perf_counter() - t0)


def real_cells(n: int = 2048) -> "np.ndarray":
    """(n, 1, 64, 64) uint16: random 64 x 64 windows of a real fluorescence field (CellProfiler ExampleHuman)."""
    import numpy as np
    import tifffile
    from pathlib import Path
    folder = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pretrain" / "cellprofiler_examples"
    field = tifffile.imread(sorted((folder / "ExampleHuman" / "images").glob("*.tif"))[0]).astype(np.uint16)
    rng = np.random.default_rng(0)
    h, w = field.shape[-2:]
    tops, lefts = rng.integers(0, h - 64, n), rng.integers(0, w - 64, n)
    return np.stack([field[..., t:t + 64, l:l + 64].reshape(1, 64, 64) for t, l in zip(tops, lefts)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64,112,224")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--variants", default=None,
                    help="default: eager,channels_last,compile_channels_last (+ fp16_channels_last on a GPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="images per forward pass (default: by size)")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    variants = args.variants or ("eager,channels_last,compile_channels_last"
                                 + (",fp16_channels_last" if device.type == "cuda" else ""))
    peaks = {"fp32": matmul_peak(min(args.seconds, 5), device=device)}
    if "fp16" in variants:
        peaks["fp16"] = matmul_peak(min(args.seconds, 5), device=device, dtype=torch.float16)
    peak = peaks["fp32"]
    result = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "processor": platform.processor() or platform.machine(),
                          "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
              "matmul_peak_gflops": round(peak, 1),
              "matmul_peak_gflops_by_dtype": {k: round(v, 1) for k, v in peaks.items()}, "cases": []}
    for size in map(int, args.sizes.split(",")):
        batch = args.batch or BATCH.get(size, 16)
        base = MicrosnoopUNet().eval()
        flops = encoder_flops(base, size)
        for variant in variants.split(","):
            model = MicrosnoopUNet().eval().to(device)
            x = torch.randn(batch, 1, size, size, device=device)
            fn = model.embed
            if "channels_last" in variant:
                model.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            t0 = time.perf_counter()
            if variant.startswith("compile"):
                fn = torch.compile(model.embed, dynamic=False)
            if variant.startswith("fp16"):
                plain = fn

                def fn(t, plain=plain):
                    with torch.autocast(device.type, dtype=torch.float16):
                        return plain(t)
            ips = throughput(fn, x, args.seconds)
            gflops = ips * flops / 1e9
            ref = peaks["fp16" if variant.startswith("fp16") else "fp32"]
            result["cases"].append({
                "size": size, "batch": batch, "variant": variant, "images_per_s": round(ips, 2),
                "gflop_per_image": round(flops / 1e9, 3), "achieved_gflops": round(gflops, 1),
                "fraction_of_matmul_peak": round(gflops / ref, 3),
                "wall_s_including_warmup": round(time.perf_counter() - t0, 1),
            })
            print(json.dumps(result["cases"][-1]), flush=True, file=__import__("sys").stderr)
    if device.type == "cuda":
        from microsnoop_ray.encode.embed import Encoder, embed
        cells = real_cells()
        enc = Encoder(MicrosnoopUNet(), device=device, precision="fp32")
        e2e_batch = args.batch or 256
        embed(cells[:e2e_batch], encoder=enc, batch_size=e2e_batch)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        embed(cells, encoder=enc, batch_size=e2e_batch)
        _sync(device)
        result["end_to_end"] = {"what": "embed() of 64x64 windows of a real field: CPU padding + percentile "
                                        "normalisation, then the encoder in fp32 on the GPU", "cells": len(cells),
                                "cells_per_s": round(len(cells) / (time.perf_counter() - t0), 1)}
    best224 = max((c for c in result["cases"] if c["size"] == 224), key=lambda c: c["images_per_s"], default=None)
    if best224:
        result["best_224"] = {"variant": best224["variant"], "fraction_of_matmul_peak": best224["fraction_of_matmul_peak"],
                              "target": 0.6, "meets_target": best224["fraction_of_matmul_peak"] >= 0.6}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
