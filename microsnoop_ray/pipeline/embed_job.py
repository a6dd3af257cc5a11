"""The ``embed`` job: a stack of images up to 224 x 224 (cells, crops) into one Parquet table."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..model.preprocess import check_images
from ..errors import InputError
from ..io.arrays import load_array
from ..io.tables import read_metadata_table
from ..io.sources import read_image_stack
from ..io.atomic import write_json
from ..io.write import profile_table, write_parquet
from .config import EncodeConfig

#: one-channel images from which ``embed`` compiles the encoder unless told
COMPILE_FROM = 512
#: the smallest input side ``embed`` compiles at unless told: at 224 the frozen compiled encoder ran 2x the
#: eager one on 2 cores; at 64 it ran 3x slower than eager (768 BBBC021 planes: 7.4 s against 2.2 s, bf16)
COMPILE_MIN_SIDE = 224


def run_embed(source: str | Path, out: str | Path, encode: EncodeConfig = EncodeConfig(),
              channel_names=None, metadata: str | Path | None = None, compile: bool | None = None,
              progress: bool = True, features: tuple[str, ...] = ("microsnoop",),
              masks: str | Path | None = None) -> dict:
    """Embed every image of ``source`` (:func:`~microsnoop_ray.io.sources.read_image_stack`) into ``out``.

    Parameters
    ----------
    encode : EncodeConfig
        Weights, normalisation, batch size, device (``auto``: CPU), precision.
    channel_names : sequence of str, optional
        One distinct name per channel (default ``ch0, ch1, ...``).
    metadata : path, optional
        CSV/Parquet with one row per image (``Metadata_`` columns).
    compile : bool, optional
        ``torch.compile`` the encoder (default: :data:`COMPILE_FROM` planes or more at :data:`COMPILE_MIN_SIDE`).
    features : tuple of str
        ``microsnoop`` (the embedding) and/or ``cellprofiler`` (cp-measure on each image's object:
        from ``masks``, else the foreground object nearest the centre).
    masks : path, optional
        ``.npy``/``.npz`` label images (N, H, W) of the cells. An image cp-measure cannot measure keeps
        its row, with NaN values and the reason in ``Metadata_Dropped_Reason`` (aligned with the input).

    Returns
    -------
    dict: ``images``, ``channels``, ``seconds``, ``model_id``, ``features``, ``dropped`` (index ->
    reason), ``out``.
    """
    images, meta = read_image_stack(source)
    n, c = check_images(images, str(source))
    names = _channel_names(channel_names, c, source)
    meta = pd.concat([meta, read_metadata_table(metadata, n)], axis=1) if metadata else meta
    label_images = _read_masks(masks, images, n) if masks else None
    from ..encode.embed import Encoder, crop_side, embed, feature_names  # torch: only once the input is known good
    from ..model.contract import input_size_for
    size = input_size_for(crop_side(images), encode.input_size)
    encoder = Encoder(encode.weights, device="cpu" if encode.device == "auto" else encode.device,
                      compile=(n * c >= COMPILE_FROM and size >= COMPILE_MIN_SIDE and "microsnoop" in features)
                      if compile is None else compile,
                      precision=encode.precision, input_size=size)
    t0 = time.perf_counter()
    values, names_out = np.zeros((n, 0), np.float32), []
    if "microsnoop" in features:
        values = embed(images, batch_size=encode.batch_size, normalization=encode.normalization, source=str(source),
                       progress=progress and n >= 64, encoder=encoder, input_size=size)
        names_out += feature_names(names)
    dropped, measured = {}, {}
    if "cellprofiler" in features:
        cp, dropped, measured = _measure(images, names, label_images)
        values, names_out = np.concatenate([values, cp], axis=1), names_out + measured.pop("names")
        if dropped:
            meta["Metadata_Dropped_Reason"] = [dropped.get(i) for i in range(n)]
    seconds = time.perf_counter() - t0
    meta.insert(0, "Metadata_ImageIndex", range(n))
    prov, summary = _records(encoder, encode, size, measured, {
        "input": str(source), "channels": names, "features": list(features), "masks": str(masks) if masks else None},
        {"images": n, "channels": c, "seconds": seconds, "features": list(features), "out": str(out)})
    write_parquet(profile_table(meta, values, names_out), out, provenance=prov)
    write_json(summary, summary_path(out))
    return {**summary, "dropped": dropped}


def _records(encoder, encode: EncodeConfig, size: int, measured: dict, inputs: dict, counts: dict,
             ) -> tuple[dict, dict]:
    """The provenance stored in the Parquet file (``inputs`` and the encoder's) and the summary written
    beside it (``counts`` and the encoder's)."""
    card = encoder.model_card
    prov = {"command": "embed", **inputs, "config": dataclasses.asdict(encode),
            "model_card": card.to_dict(size) if card else None, "normalization": encode.normalization,
            "encoder_arithmetic": encoder.arithmetic, "input_size": size, "cellprofiler": measured or None}
    summary = {**counts, "model_id": card.model_id if card else "model", "precision": encoder.precision,
               "input_size": size, **({"cellprofiler": measured} if measured else {})}
    return prov, summary


def _channel_names(given, c: int, source) -> list[str]:
    """One distinct, non-empty name per channel (default ``ch0, ch1, ...``); InputError naming the input."""
    names = list(given) if given else [f"ch{i}" for i in range(c)]
    if len(names) != c or len(set(names)) != c or not all(names):
        raise InputError(source, f"--channel-names gives {len(names)} distinct non-empty names for {c} channels: "
                                 f"{','.join(names)!r}")
    return names


def _measure(images, names: list[str], label_images) -> tuple[np.ndarray, dict, dict]:
    """cp-measure on every image, on one pixel scale for the set: values (n, D), failed index -> reason, and
    what the provenance records (scale, counts, and the column ``names``)."""
    from ..features.cellprofiler import cellprofiler_names, image_scale, measure_crops, require_cp_measure

    require_cp_measure()
    stack = _stack(images)
    scale = image_scale(stack)
    values, dropped = measure_crops(stack, names, label_images, scale=scale)
    return values, dropped, {"pixel_scale": {"dtype": str(stack.dtype), "divided_by": scale},
                             **measurement_counts(len(stack), dropped), "names": cellprofiler_names(names)}


def summary_path(out: str | Path) -> Path:
    """Where ``embed`` writes its summary: beside the table, ``<name>.summary.json``."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".parquet") + ".summary.json")


def measurement_counts(n: int, dropped: dict) -> dict:
    """``measured`` / ``not_measured`` counts and the reasons counted, for the summary and the console."""
    reasons: dict[str, int] = {}
    for why in dropped.values():
        reasons[why] = reasons.get(why, 0) + 1
    return {"measured": n - len(dropped), "not_measured": len(dropped),
            "not_measured_by_reason": dict(sorted(reasons.items(), key=lambda kv: -kv[1]))}


def _stack(images) -> np.ndarray:
    """The images as one (N, C, H, W) array (a list of equal-size arrays is stacked)."""
    if isinstance(images, (list, tuple)):
        shapes = {np.shape(im) for im in images}
        if len(shapes) != 1:
            raise InputError("images", f"CellProfiler measurements need images of one size, got {sorted(shapes)[:3]}")
        return np.stack([np.asarray(im) for im in images])
    return np.asarray(images)


def _read_masks(path: str | Path, images, n: int) -> np.ndarray:
    """(N, H, W) integer label images matching the images."""
    masks = load_array(path)
    shape = _stack(images).shape if isinstance(images, (list, tuple)) else images.shape
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.shape != (n, *shape[-2:]) or masks.dtype.kind not in "iub":
        raise InputError(path, f"masks must be (N, H, W) = {(n, *shape[-2:])} integer labels, got {masks.shape} "
                               f"{masks.dtype}")
    return masks
