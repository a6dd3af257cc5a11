"""The whole plate on one device: bare encoder against the chip's peak, the real profile job, Cellpose.

Measures, in one run (prints one JSON document, also written to ``--out``):

1. the matmul peaks of the device in bf16 and fp32 (8192^3 on CUDA), measured here;
2. the bare encoder (``Encoder``, channels_last, ``torch.compile`` with a fixed batch) in images/s
   at 224 and 64 for each precision (fp32, tf32, bf16, fp16), and its fraction of the measured peak
   (12.67 GFLOP per 224 image, 1.03 at 64: METHOD.md section 7);
3. each precision's embeddings against fp32 on real cells: the median relative error of the *centred*
   embeddings (each row minus the set's mean; cosine would hide errors of 30 %, since every embedding
   shares one large component) and the max absolute difference; the fastest precision within 0.05 of
   fp32 by the centred measure is the one the pipeline run uses;
4. the real ``profile`` job (embedded Ray) on a plate of at least ``--cells`` real cells (the carried
   BBBC021 cells repeated over plates): cells/s, the encoder actors' busy share, and the ratio to the
   bare encoder (``embed_crops`` on the same crops, same precision and batch);
5. Cellpose fields/s on the device against the CPU on the same fields (real fluorescence fields of
   the Data Science Bowl set), with the masks compared (objects and IoU).

The GPU machine has no network and takes 64 MiB with the tree, so the inputs travel in a small
ignored folder made here first::

    python benchmarks/gpu_plate.py --prepare .devdata        # 240 real cells, 8 real fields
    # on the device (see README, "GPU"):
    bash .devbundle/install && export PYTHONPATH=/tmp/site:$PWD && \\
        python benchmarks/gpu_plate.py --data .devdata --device cuda --out $OUT/gpu_plate.json

Cellpose runs with its network's architecture at a seeded random initialisation when no weights
file is given (``--cellpose-weights``): speed does not depend on the weights, but the masks of such a
network are not meaningful, and the JSON says which it was.

On this CPU (no compile; a smoke run, not a measurement):
``python benchmarks/gpu_plate.py --data .devdata --device cpu --cells 240 --fields 1 --seconds 1``.
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
SHARED = ROOT.parent / "shared" / "data"
GFLOP = {224: 12.67, 64: 1.03}
#: how far a reduced precision may move the centred embeddings (issue 23)
FAITHFUL = 0.05
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def prepare(dest: Path, n_cells: int = 240, n_fields: int = 8) -> None:
    """Copy a few real inputs into ``dest`` (a folder ignored by git, carried to the device)."""
    import imageio.v3 as iio

    dest.mkdir(parents=True, exist_ok=True)
    meta = pd.read_csv(SHARED / "bbbc021_chx" / "cells.csv")
    pick = np.sort(np.random.default_rng(0).choice(len(meta), n_cells, replace=False))
    np.savez_compressed(dest / "cells.npz", images=np.load(SHARED / "bbbc021_chx" / "cells.npz")["images"][pick])
    meta.iloc[pick].to_csv(dest / "cells.csv", index=False)
    (dest / "fields").mkdir(exist_ok=True)
    done = 0
    for f in sorted((SHARED / "pretrain" / "dsb2018_stage1").glob("train_*.png")):
        im = iio.imread(f)
        if im.ndim == 2 and im.shape[0] >= 256 and im.shape[1] >= 256 and done < n_fields:
            iio.imwrite(dest / "fields" / f.name, im)
            done += 1
    print(json.dumps({"prepared": str(dest), "cells": n_cells, "fields": done,
                      "bytes": sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())}))


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peaks(device) -> dict:
    """Measured TFLOP/s of a square matmul in bf16 and in fp32 (TF32 off)."""
    import torch

    n = 8192 if device.type == "cuda" else 1024
    out = {}
    torch.backends.cuda.matmul.allow_tf32 = False
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        sync(device)
        reps = 20 if device.type == "cuda" else 3
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        out[name] = 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12
    return {k: round(v, 5) for k, v in out.items()}


def bare_encoder(model, device, size: int, batch: int, precision: str, seconds: float) -> float:
    """Images/s of the compiled channels_last encoder on random normalised planes of ``size``."""
    import torch

    from microsnoop_ray.encode.embed import Encoder

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    enc = Encoder(model, device=device, compile=device.type == "cuda", precision=precision)
    x = torch.rand(batch, 1, size, size, device=device)
    for _ in range(3):
        enc._forward(x)
    sync(device)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        enc._forward(x)
        n += batch
    sync(device)
    return n / (time.perf_counter() - t)


def accuracy(model, device, crops: list, precision: str, ref: np.ndarray) -> dict:
    import torch

    from microsnoop_ray.encode.embed import Encoder

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    from microsnoop_ray.evaluate.metrics import centred_relative_error

    e = Encoder(model, device=device, precision=precision).embed_crops(crops)
    return {"max_abs_diff": float(np.abs(e - ref).max()),
            "centred_median_relative_error": round(centred_relative_error(e, ref), 5)}


def plate_of(data: Path, n_cells: int, dest: Path) -> tuple[Path, Path, int]:
    """The carried cells repeated over plates ``R000``, ``R001``, ... until there are ``n_cells``."""
    images = np.load(data / "cells.npz")["images"]
    meta = pd.read_csv(data / "cells.csv")
    reps = -(-n_cells // len(images))
    np.save(dest / "cells.npy", np.concatenate([images] * reps))
    parts = [meta.assign(Metadata_Plate=f"R{r:03d}_" + meta["Metadata_Plate"].astype(str)) for r in range(reps)]
    pd.concat(parts, ignore_index=True).to_csv(dest / "cells.csv", index=False)
    return dest / "cells.npy", dest / "cells.csv", reps * len(images)


def cellpose_speed(data: Path, device, weights: str | None, fields: int) -> dict:
    import imageio.v3 as iio
    import torch

    from microsnoop_ray.segment import CellposeSegmenter

    planes = [iio.imread(f).astype(np.float32) for f in sorted((data / "fields").glob("*.png"))[:fields]]
    if weights is None:
        from cellpose.resnet_torch import CPnet
        torch.manual_seed(0)
        net = CPnet([2, 32, 64, 128, 256], 3, sz=3)
        sd = {**net.state_dict(), "diam_mean": torch.tensor([30.0]), "diam_labels": torch.tensor([30.0])}
        weights = str(Path(tempfile.mkdtemp()) / "cellpose_random_init.pt")
        torch.save(sd, weights)
        kind = "Cellpose architecture, seeded random initialisation (speed only; masks not meaningful)"
    else:
        kind = f"Cellpose weights {Path(weights).name}"
    out = {"weights": kind, "fields": len(planes), "field_shapes": sorted({p.shape for p in planes})}
    masks = {}
    for name, gpu in (("cpu", False), ("gpu", True)) if device.type == "cuda" else (("cpu", False),):
        seg = CellposeSegmenter(weights, gpu=gpu, batch_size=32 if gpu else 8)
        seg(planes[:1])  # warm-up
        t = time.perf_counter()
        masks[name] = seg(planes)
        out[f"{name}_fields_per_s"] = round(len(planes) / (time.perf_counter() - t), 3)
    if "gpu" in masks:
        out["cellpose_gpu_over_cpu"] = round(out["gpu_fields_per_s"] / out["cpu_fields_per_s"], 2)
        a, b = masks["cpu"], masks["gpu"]
        out["objects_cpu"] = [int(m.max()) for m in a]
        out["objects_gpu"] = [int(m.max()) for m in b]
        out["foreground_iou"] = [round(float(((x > 0) & (y > 0)).sum() / max(1, ((x > 0) | (y > 0)).sum())), 4)
                                 for x, y in zip(a, b)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepare", type=Path, default=None, help="write the carried inputs here and stop")
    ap.add_argument("--data", type=Path, default=ROOT / ".devdata")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cells", type=int, default=20000)
    ap.add_argument("--fields", type=int, default=8)
    ap.add_argument("--batch", type=int, default=None, help="encoder batch (default 512 on CUDA, 32 on CPU)")
    ap.add_argument("--seconds", type=float, default=None, help="per bare-encoder case (default 4 CUDA, 2 CPU)")
    ap.add_argument("--cellpose-weights", default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    import torch

    from microsnoop_ray.model import load_model

    t_all = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (512 if cuda else 32)
    seconds = args.seconds or (4.0 if cuda else 2.0)
    model = load_model()
    doc = {"device": torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)",
           "torch": torch.__version__, "batch": batch, "weights": model.model_card.model_id}
    doc["matmul_peak_tflops"] = peaks = matmul_peaks(device)

    # 2-3. bare encoder per precision, and its embeddings against fp32 on real cells
    cells = np.load(args.data / "cells.npz")["images"]
    crops = [plane for cell in cells for plane in cell]
    from microsnoop_ray.encode.embed import Encoder
    ref = Encoder(model, device=device, precision="fp32").embed_crops(crops)
    precisions = PRECISIONS if cuda else ("fp32",)
    enc = {}
    for p in precisions:
        row = {"accuracy_vs_fp32": accuracy(model, device, crops, p, ref)}
        for size in (224, 64):
            ips = bare_encoder(model, device, size, batch, p, seconds)
            row[f"images_per_s_{size}"] = round(ips, 1)
            row[f"tflops_{size}"] = round(ips * GFLOP[size] / 1e3, 5)
        row["fraction_of_bf16_peak_224"] = round(row["tflops_224"] / peaks["bf16"], 4)
        row["fraction_of_fp32_peak_224"] = round(row["tflops_224"] / peaks["fp32"], 4)
        enc[p] = row
    doc["encoder"] = enc
    ok = [p for p in precisions if enc[p]["accuracy_vs_fp32"]["centred_median_relative_error"] <= FAITHFUL]
    best = max(ok, key=lambda p: enc[p]["images_per_s_224"])
    doc["fastest_faithful_precision"] = best
    doc["faithful_means"] = f"median relative error of centred embeddings against fp32 <= {FAITHFUL}"
    doc["encoder_fraction_of_bf16_peak"] = max(enc[p]["fraction_of_bf16_peak_224"] for p in precisions)

    # 4. the real profile job on >= --cells cells, against the bare encoder on the same crops
    import ray

    from microsnoop_ray.pipeline.plate_job import ProfileConfig, run_profile
    tmp = Path(tempfile.mkdtemp())
    arr, table, n_cells = plate_of(args.data, args.cells, tmp)
    all_crops = [plane for cell in np.load(arr, mmap_mode="r") for plane in cell]
    e = Encoder(model, device=device, compile=cuda, precision=best)
    e.embed_crops(all_crops[:batch])
    sync(device)
    t = time.perf_counter()
    for s in range(0, len(all_crops), batch):
        e.embed_crops(all_crops[s:s + batch])
    sync(device)
    bare_cells_s = n_cells / (time.perf_counter() - t)
    del e
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    cfg = ProfileConfig.from_mapping({
        "inputs": [str(arr)], "cell_table": str(table), "out": str(tmp / "out"),
        "channel_names": ["DNA", "ch1", "ch2"], "batch_size": batch, "cells_chunk": 512, "progress": False,
        "sphering": {"scope": "none"}, "device": "cuda" if cuda else "cpu", "compile": cuda, "precision": best})
    t = time.perf_counter()
    summary = run_profile(cfg, progress_print=lambda *a: None)
    pipe_s = time.perf_counter() - t
    ray.shutdown()
    done = sum(p["cells"] for p in summary["plates"].values())
    doc["pipeline"] = {"cells": done, "seconds": round(pipe_s, 1), "cells_per_s": round(done / pipe_s, 1),
                       "bare_encoder_cells_per_s_same_crops": round(bare_cells_s, 1),
                       "this_run": summary["this_run"], "precision": best}
    doc["cells"] = done
    doc["pipeline_over_bare_encoder"] = round(done / pipe_s / bare_cells_s, 3)
    doc["encoder_busy_share"] = summary["this_run"].get("encoder_busy_share")

    # 5. Cellpose on the device against the CPU
    doc["cellpose"] = cellpose_speed(args.data, device, args.cellpose_weights, args.fields)
    doc["cellpose_gpu_over_cpu"] = doc["cellpose"].get("cellpose_gpu_over_cpu")
    doc["targets"] = {"encoder_fraction_of_bf16_peak": 0.4, "pipeline_over_bare_encoder": 0.9,
                      "encoder_busy_share": 0.9, "cellpose_gpu_over_cpu": 10}
    doc["seconds"] = round(time.perf_counter() - t_all, 1)
    text = json.dumps(doc, indent=1, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
