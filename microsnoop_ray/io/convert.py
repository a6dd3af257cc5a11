"""Convert folders of TIFFs (file-name pattern) or ``load_data.csv`` tables into OME-Zarr plates."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError
from .images import read_field
from .tables import parse_file_names, read_image_table
from .zarr_plate import write_plate


def convert_folder(folder: str | Path, pattern: str, out: str | Path, plate: str | None = None,
                   channel_names: Mapping[str, str] | Sequence[str] | None = None, version: str = "0.4") -> Path:
    """Write one OME-Zarr plate from a folder of one-channel images named by a pattern.

    Parameters
    ----------
    folder : path
    pattern : str
        Regular expression with named groups ``well`` (or ``row``, ``column``), ``site``
        and ``channel``; see :func:`~microsnoop_ray.io.tables.parse_file_names`.
    out : path
        The plate folder to write (``<plate>.zarr``).
    channel_names : mapping channel token -> name, or sequence in token order, optional
        E.g. ``{"d0": "DNA", "d2": "GFP"}``; default: the tokens themselves.
    version : {"0.4", "0.5"}
    """
    files = parse_file_names(folder, pattern)
    tokens = sorted(files["Metadata_Channel"].unique())
    if channel_names is None:
        names = tokens
    elif isinstance(channel_names, Mapping):
        missing = [t for t in tokens if t not in channel_names]
        if missing:
            raise InputError(folder, f"no channel name for token(s) {missing}")
        names = [channel_names[t] for t in tokens]
    else:
        if len(channel_names) != len(tokens):
            raise InputError(folder, f"{len(channel_names)} channel names for {len(tokens)} channels {tokens}")
        names = list(channel_names)
    fields = {}
    for (well, site), group in files.groupby(["Metadata_Well", "Metadata_Site"], sort=True):
        by_channel = dict(zip(group["Metadata_Channel"], group["path"]))
        missing = [t for t in tokens if t not in by_channel]
        if missing:
            raise InputError(f"{folder}: well {well}, site {site}", f"no file for channel(s) {missing}")
        planes = [read_field(by_channel[t]) for t in tokens]
        if len({p.shape for p in planes}) != 1:
            raise InputError(f"{folder}: well {well}, site {site}", "channel images differ in size")
        fields[(well, int(site))] = np.concatenate(planes, axis=0)
    out = Path(out)
    return write_plate(out, fields, names, name=plate or out.name.removesuffix(".zarr"), version=version)


def convert_table(table: str | Path, out_dir: str | Path, version: str = "0.4") -> list[Path]:
    """Write one OME-Zarr plate per plate of an image table / ``load_data.csv``."""
    df, channels = read_image_table(table)
    written = []
    for plate, sub in df.groupby("Metadata_Plate", sort=True):
        fields = {}
        for r in sub.itertuples(index=False):
            planes = [read_field(getattr(r, f"Path_{c}")) for c in channels]
            fields[(r.Metadata_Well, int(r.Metadata_Site))] = np.concatenate(planes, axis=0)
        written.append(write_plate(Path(out_dir) / f"{plate}.zarr", fields, channels, name=str(plate),
                                   version=version))
    return written
