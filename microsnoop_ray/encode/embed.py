"""Embeddings of images up to 224 x 224: ``embed(images) -> (N, 256 * C)``.

Every channel is embedded separately (zero-padded centred to the data set's input size,
:func:`~microsnoop_ray.model.contract.input_size_for`: 64 for cells up to 72 px, 224 for
224-px crops; percentile normalised after padding, encoder in eval mode, L2-normalised global average
pool of the deepest map) and the C embeddings are concatenated in channel order.
Images stream through the encoder in chunks, so memory stays bounded for any N:
``images`` may be a NumPy array, a memory map, a Zarr array or a list of arrays.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..errors import InputError
from ..model import MicrosnoopUNet, load_model, EMBED_DIM, INPUT_SIZE, input_size_for
from .precision import FP32_BLOCKS, lower_dtype, resolve_device, resolve_precision
from ..model.preprocess import check_images, fit_center, normalize_percentile, pad_normalize_torch


def _padded_chunk(images, start: int, stop: int, size: int) -> np.ndarray:
    if isinstance(images, (list, tuple)):
        return np.stack([fit_center(np.asarray(images[i], dtype=np.float32), size) for i in range(start, stop)])
    return fit_center(np.asarray(images[start:stop], dtype=np.float32), size)


def crop_side(images) -> int:
    """The largest side of an image stack (N, C, H, W) or of a sequence of (C, H, W) arrays."""
    if isinstance(images, (list, tuple)):
        return max(max(np.shape(im)[-2:]) for im in images)
    return int(max(images.shape[-2:]))


class Encoder:
    """A model prepared for inference on one device (eval mode, no autograd).

    Parameters
    ----------
    model : MicrosnoopUNet or path or None
        A loaded model, a checkpoint path, or None for the default weights.
    device : str or torch.device, optional
    channels_last : bool
        Use the channels-last memory format (faster on CPU; see benchmarks/encoder.py).
    precision : {"auto", "fp32", "tf32", "bf16", "fp16"}
        ``auto`` (the default) is ``bf16`` where the device runs it natively, else ``fp32``
        (:func:`resolve_precision`; :attr:`arithmetic` records the choice). ``bf16``/``fp16`` run
        the residual blocks after the first (:data:`FP32_BLOCKS`) in that type, and the first
        block, the pooling, the global average and the L2 normalisation in fp32; on this
        project's AMX CPU that is 1.6x faster than fp32 at a median relative error of the
        centred embeddings of 0.005 (``benchmarks/bf16_cpu.py``). ``tf32`` allows TF32
        matmuls and convolutions on CUDA.
    input_size : int
        The side :meth:`embed_crops` pads crops to (larger ones are centre-cut): one per data set,
        from :func:`~microsnoop_ray.model.contract.input_size_for`.
    compile : bool
        Wrap the encoder in ``torch.compile`` (with frozen weights on a CPU): on this
        project's 2 CPU cores at 224, bf16 18-22 planes/s instead of 9 eager, fp32 8.9
        instead of 5.8, after a one-off compile of 40-50 s with an empty cache
        (``benchmarks/embed_cli.py``). Every call is then padded to the largest batch
        seen so far, so that the graph is compiled once, not once per batch size.
    """

    def __init__(self, model=None, device=None, channels_last: bool = True, compile: bool = False,
                 precision: str = "auto", input_size: int = INPUT_SIZE):
        self.input_size = input_size_for(INPUT_SIZE, input_size)
        if not isinstance(model, MicrosnoopUNet):
            model = load_model(model)
        self.device = resolve_device(device)
        self.precision, why = resolve_precision(precision, self.device)
        #: what the provenance records: the arithmetic used, what was asked, and why
        self.arithmetic = {"precision": self.precision, "asked": precision, "why": why}
        lower = lower_dtype(self.precision)
        if lower is not None:
            self.arithmetic["fp32"] = (f"down block(s) {', '.join(map(str, FP32_BLOCKS))}, max pooling, "
                                       "global average, L2 normalisation")
        if self.precision == "tf32" and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.model = model.eval().to(self.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._fn = (lambda x: self.model.embed(x, lower, FP32_BLOCKS)) if lower is not None else self.model.embed
        self.compiled = bool(compile)
        self._fixed_batch = 0
        if compile:
            if self.device.type == "cpu":
                # Freezing makes the weights constants, folded and prepacked for oneDNN: on this
                # project's CPU 1.2-1.6x faster in bf16 and 1.4x in fp32 than compiling without it.
                # Inductor reads it from its global config (``torch.compile(options=...)`` and a patch
                # around the call do not reach it); it only changes graphs compiled without autograd.
                import torch._inductor.config as inductor

                inductor.freezing = True
            self._fn = torch.compile(self._fn, dynamic=False)

    @property
    def model_card(self):
        return getattr(self.model, "model_card", None)

    @torch.inference_mode()
    def __call__(self, planes: np.ndarray) -> np.ndarray:
        """(n, s, s) float32 normalised planes -> (n, 256) float32 embeddings."""
        x = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32))[:, None]
        return self._forward(x.to(self.device, non_blocking=True))

    @torch.inference_mode()
    def embed_crops(self, crops, normalization: str = "default") -> np.ndarray:
        """One-channel crops at their native size and dtype -> (n, 256) float32 embeddings.

        Fitting to :attr:`input_size` (centre-cut, then zero padding) and the percentile
        normalisation run here, batched (on a GPU in torch on the encoder's device (:func:`~microsnoop_ray.model.preprocess.pad_normalize_torch`), equal to
        the NumPy path of :func:`embed` within 1e-5).
        """
        if not len(crops):
            return np.zeros((0, EMBED_DIM), np.float32)
        size = self.input_size
        if self.device.type == "cpu":  # NumPy's partition-based percentiles are 3x faster than a torch sort here
            planes = normalize_percentile(np.stack([fit_center(np.asarray(c, np.float32), size) for c in crops]),
                                          mode=normalization)
            return self._forward(torch.from_numpy(planes)[:, None])
        x = pad_normalize_torch(crops, size, normalization, self.device, pin_memory=True)
        return self._forward(x)

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor) -> np.ndarray:
        n = len(x)
        if self.compiled:
            self._fixed_batch = max(self._fixed_batch, n)
            if n < self._fixed_batch:  # eval-mode BatchNorm: padding rows do not affect the others
                x = torch.cat([x, x.new_zeros((self._fixed_batch - n,) + tuple(x.shape[1:]))])
        x = x.contiguous(memory_format=self.memory_format)
        return self._fn(x)[:n].float().cpu().numpy()


def embed(images, model=None, batch_size: int = 32, device=None, normalization: str = "default",
          source: str = "images", progress: bool = False, encoder: Encoder | None = None,
          precision: str = "auto", input_size: str | int = "auto") -> np.ndarray:
    """Microsnoop embeddings of images up to 224 x 224.

    Parameters
    ----------
    images : array-like, shape (N, C, H, W), or sequence of (C, H, W) arrays
        Any numeric dtype; ``H, W <= 224``. Sizes may differ between the arrays
        of a sequence. Read in chunks, so a memory map or Zarr array works.
    model : MicrosnoopUNet or str or None
        Loaded model or checkpoint path; None means the default shipped weights.
    batch_size : int
        One-channel images per forward pass (memory is bounded by this).
    device : str or torch.device, optional
        CPU by default; ``"cuda"`` when asked and present.
    normalization : {"default", "faithful"}
        Degenerate-case handling of the percentile normalisation; see
        :func:`microsnoop_ray.model.preprocess.normalize_percentile`.
    source : str
        Name of the input, for error messages.
    progress : bool
        Show a progress bar (tqdm, on stderr).
    encoder : Encoder, optional
        A prepared encoder to reuse (overrides ``model``, ``device`` and ``precision``).
    precision : {"auto", "fp32", "tf32", "bf16", "fp16"}
        The encoder's arithmetic (:class:`Encoder`): ``auto`` is bf16 where the device runs it
        natively, else fp32; ``fp32`` gives the reference's numbers.
    input_size : "auto" or int
        The side every image is fitted to (:func:`~microsnoop_ray.model.contract.input_size_for` of
        the stack's largest side: 64 for cells up to 72 px); ``224`` is the published contract.

    Returns
    -------
    ndarray, shape (N, 256 * C), float32
        Row i is image i; columns ``c*256 .. c*256+255`` are channel c.

    Raises
    ------
    InputError
        Bad shape or dtype, images larger than 224, or NaN/inf pixels (the
        message names ``source`` and the image index).
    """
    n, c = check_images(images, source)
    size = input_size_for(crop_side(images), input_size)
    enc = encoder if encoder is not None else Encoder(model, device, precision=precision)
    per_chunk = max(1, batch_size // c)
    out = np.empty((n, EMBED_DIM * c), dtype=np.float32)
    with _progress(n if progress else 0) as bar:
        for start in range(0, n, per_chunk):
            stop = min(n, start + per_chunk)
            chunk = _padded_chunk(images, start, stop, size)  # (m, C, size, size)
            bad = ~np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1)
            if bad.any():
                raise InputError(source, f"image {start + int(np.argmax(bad))} has NaN or infinite pixels")
            planes = normalize_percentile(chunk.reshape(-1, size, size), mode=normalization)
            out[start:stop] = enc(planes).reshape(stop - start, EMBED_DIM * c)
            bar.update(stop - start)
    return out


def _progress(total: int):
    """A tqdm bar on stderr for ``total`` images, or (0) one that shows nothing."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="embed", leave=False, disable=not total)


def feature_names(channel_names: Sequence[str], prefix: str = "Microsnoop") -> list[str]:
    """Column names ``<prefix>_<channel>_000 .. _255``, channel-major."""
    return [f"{prefix}_{ch}_{i:03d}" for ch in channel_names for i in range(EMBED_DIM)]


# --------------------------------------------------------------------------- whole fields
