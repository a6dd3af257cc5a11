"""The ``embed`` job: a stack of images up to 224 x 224 (cells, crops) into one Parquet table."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pandas as pd

from ..encode import Encoder, check_images, embed, feature_names
from ..errors import InputError
from ..io.arrays import read_metadata_table
from ..io.sources import read_image_stack
from ..io.write import profile_table, write_parquet
from .config import EncodeConfig

#: one-channel images from which ``embed`` compiles the encoder unless told
COMPILE_FROM = 512


def run_embed(source: str | Path, out: str | Path, encode: EncodeConfig = EncodeConfig(),
              channel_names=None, metadata: str | Path | None = None, compile: bool | None = None,
              progress: bool = True) -> dict:
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
        ``torch.compile`` the encoder (default: from :data:`COMPILE_FROM` one-channel images on).

    Returns
    -------
    dict: ``images``, ``channels``, ``seconds``, ``model_id``, ``out``.
    """
    images, meta = read_image_stack(source)
    n, c = check_images(images, str(source))
    names = list(channel_names) if channel_names else [f"ch{i}" for i in range(c)]
    if len(names) != c or len(set(names)) != c or not all(names):
        raise InputError(source, f"--channel-names gives {len(names)} distinct non-empty names for {c} channels: "
                                 f"{','.join(names)!r}")
    if metadata:
        meta = pd.concat([meta, read_metadata_table(metadata, n)], axis=1)
    encoder = Encoder(encode.weights, device="cpu" if encode.device == "auto" else encode.device,
                      compile=(n * c >= COMPILE_FROM) if compile is None else compile, precision=encode.precision)
    t0 = time.perf_counter()
    feats = embed(images, batch_size=encode.batch_size, normalization=encode.normalization, source=str(source),
                  progress=progress and n >= 64, encoder=encoder)
    seconds = time.perf_counter() - t0
    meta.insert(0, "Metadata_ImageIndex", range(n))
    card = encoder.model_card
    write_parquet(profile_table(meta, feats, feature_names(names)), out, provenance={
        "command": "embed", "input": str(source), "channels": names, "config": dataclasses.asdict(encode),
        "model_card": card.to_dict() if card else None, "normalization": encode.normalization})
    return {"images": n, "channels": c, "seconds": seconds, "model_id": card.model_id if card else "model",
            "out": str(out)}
