"""The encoder's arithmetic: which precisions exist, what ``auto`` means on a device, and which parts
stay fp32.

Kept apart from :mod:`~microsnoop_ray.encode.embed` so that the configuration (which lists the
choices) imports without torch: the Ray workers that only read and crop never load it.
"""
from __future__ import annotations

#: encoder arithmetic. ``auto``: bf16 where the hardware runs it natively (a CPU with AVX-512 BF16 or
#: AMX, a CUDA device with bf16), else fp32; ``tf32``: TF32 matmuls and convolutions (CUDA);
#: ``bf16``/``fp16``: the residual blocks but the first in that type, pooling and normalisation in fp32
#: (:meth:`~microsnoop_ray.model.MicrosnoopUNet.embed`)
PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
#: Down blocks that stay fp32 under bf16/fp16. The first works on the raw normalised pixels at full
#: resolution; in bf16 it moved the dev sets' kNN by up to 0.0104 (chx dose, k = 21) against fp32, kept
#: in fp32 the centred error falls from 0.016 to 0.005 and the speed-up from 2.1x to 1.6x
#: (``benchmarks/bf16_cpu.py --dev``).
FP32_BLOCKS = (0,)


def lower_dtype(precision: str):
    """The torch dtype the residual blocks run in under ``precision`` (bf16, fp16), or None (fp32, tf32)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def native_bf16(device) -> str | None:
    """What makes bf16 native on ``device`` (a ``torch.device``: an instruction set, a CUDA
    capability), or None.

    Decided on the machine that runs the encoder: CPUs without AVX-512 BF16 emulate bf16 and run
    it several times slower than fp32 (0.24 images/s was measured on one such machine).
    """
    import torch

    if device.type == "cuda":
        return f"CUDA {torch.cuda.get_device_name(device)} with bf16" if torch.cuda.is_bf16_supported() else None
    if device.type != "cpu":
        return None
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "CPU with AMX (amx_bf16)"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "CPU with AVX-512 BF16 (avx512_bf16)"
    return None


def resolve_precision(precision: str, device) -> tuple[str, str]:
    """``(arithmetic, why)``: what ``precision`` means on ``device`` (``auto`` decided here)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision != "auto":
        return precision, "asked for"
    native = native_bf16(device)
    if native:
        return "bf16", f"auto: {native}"
    return "fp32", f"auto: no native bf16 on this {device.type}"


def resolve_device(device=None):
    """``None`` -> the CPU; ``"cuda"`` only when CUDA is present (clear error otherwise). Returns a
    ``torch.device``."""
    import torch

    if device is None:
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device on this machine")
    return device
