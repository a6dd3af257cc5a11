"""Encoder throughput on this machine, against its measured matrix-multiply peak.

Prints one JSON document: for input sizes 64, 112 and 224 and for each variant
(eager, channels_last, torch.compile + channels_last), images/s and achieved
GFLOP/s (FLOPs counted by torch's FlopCounterMode on the real encoder), and the
fraction of the float32 matmul peak measured in the same run.

Usage: python benchmarks/encoder.py [--sizes 64,112,224] [--seconds 8]
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


def matmul_peak(seconds: float, n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        for _ in range(4):
            a @ b
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
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn(x)
            n += len(x)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64,112,224")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--variants", default="eager,channels_last,compile_channels_last")
    args = ap.parse_args()
    torch.manual_seed(0)
    peak = matmul_peak(min(args.seconds, 5))
    result = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "processor": platform.processor() or platform.machine()},
              "matmul_peak_gflops": round(peak, 1), "cases": []}
    for size in map(int, args.sizes.split(",")):
        batch = BATCH.get(size, 16)
        base = MicrosnoopUNet().eval()
        flops = encoder_flops(base, size)
        for variant in args.variants.split(","):
            model = MicrosnoopUNet().eval()
            x = torch.randn(batch, 1, size, size)
            fn = model.embed
            if "channels_last" in variant:
                model.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            t0 = time.perf_counter()
            if variant.startswith("compile"):
                fn = torch.compile(model.embed, dynamic=False)
            ips = throughput(fn, x, args.seconds)
            gflops = ips * flops / 1e9
            result["cases"].append({
                "size": size, "batch": batch, "variant": variant, "images_per_s": round(ips, 2),
                "gflop_per_image": round(flops / 1e9, 3), "achieved_gflops": round(gflops, 1),
                "fraction_of_matmul_peak": round(gflops / peak, 3),
                "wall_s_including_warmup": round(time.perf_counter() - t0, 1),
            })
            print(json.dumps(result["cases"][-1]), flush=True, file=__import__("sys").stderr)
    best224 = max((c for c in result["cases"] if c["size"] == 224), key=lambda c: c["images_per_s"], default=None)
    if best224:
        result["best_224"] = {"variant": best224["variant"], "fraction_of_matmul_peak": best224["fraction_of_matmul_peak"],
                              "target": 0.6, "meets_target": best224["fraction_of_matmul_peak"] >= 0.6}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
