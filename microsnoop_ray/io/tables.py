"""Tabular inputs: image tables (Parquet / ``load_data.csv``), plate maps, single-cell arrays.

All returned metadata columns carry the ``Metadata_`` prefix and wells are written ``A01``.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import InputError
from .zarr_plate import split_well

log = logging.getLogger(__name__)

_WELL_ALIASES = ("Metadata_Well", "Well", "well", "well_position", "Metadata_well_position", "Metadata_Well_Position",
                 "WellName")
_PLATE_ALIASES = ("Metadata_Plate", "Plate", "plate", "Assay_Plate_Barcode", "Metadata_Assay_Plate_Barcode")


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV (optionally gzipped), TSV or Parquet table."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "table does not exist")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        sep = "\t" if ".tsv" in path.suffixes or ".txt" in path.suffixes else ","
        return pd.read_csv(path, sep=sep)
    except Exception as exc:
        raise InputError(path, f"cannot read table ({type(exc).__name__}: {exc})") from None


def sample_per_group(meta: pd.DataFrame, by: Sequence[str], n: int, seed: int = 0) -> np.ndarray:
    """Sorted positional indices of at most ``n`` random rows of every group of ``meta`` by the
    columns ``by`` (reproducible with ``seed``; the same rows whatever the number of groups)."""
    draw = np.random.default_rng(seed).random(len(meta))
    rank = pd.Series(draw, index=meta.index).groupby([meta[c] for c in by]).rank(method="first")
    return np.flatnonzero(rank.to_numpy() <= n)


def normalize_well(value, where: str = "") -> str:
    """``"b3"``, ``"B3"``, ``"B03"`` -> ``"B03"``."""
    try:
        row, col = split_well(value)
    except ValueError as exc:
        raise InputError(where or "table", str(exc)) from None
    return f"{row}{col:02d}"


def _rename_first(df: pd.DataFrame, aliases, target: str) -> pd.DataFrame:
    for a in aliases:
        if a in df.columns:
            return df.rename(columns={a: target}) if a != target else df
    return df


def with_metadata_prefix(df: pd.DataFrame) -> pd.DataFrame:
    """Prefix every column that lacks it with ``Metadata_``."""
    return df.rename(columns={c: c if str(c).startswith("Metadata_") else f"Metadata_{c}" for c in df.columns})


def read_metadata_table(path: str | Path, n: int) -> pd.DataFrame:
    """A table (:func:`read_table`) with one row per image; columns get the ``Metadata_`` prefix."""
    df = read_table(path)
    if len(df) != n:
        raise InputError(path, f"metadata table has {len(df)} rows but the input has {n} images")
    return with_metadata_prefix(df).reset_index(drop=True)


def _channel_columns(df: pd.DataFrame) -> dict[str, dict[str, str]]:
    """``{channel: {"file": column, "path": column or ""}}`` for image and illumination columns, by kind
    (``image`` / ``illum``). CellProfiler's ``Orig`` prefix is not part of the channel's name
    (``FileName_OrigDNA`` is channel ``DNA``, as its profiles name it ``_DNA``); ``FileName_Illum<Ch>``
    with ``PathName_Illum<Ch>`` is channel ``Ch``'s illumination function."""
    found: dict[str, dict[str, dict[str, str]]] = {"image": {}, "illum": {}}
    for col in map(str, df.columns):
        m = re.fullmatch(r"(Path|FileName)_(.+)", col)
        if not m:
            continue
        name = m.group(2)
        kind = "illum" if name.startswith("Illum") and len(name) > 5 else "image"
        ch = name[5:] if kind == "illum" else name[4:] if name.startswith("Orig") and len(name) > 4 else name
        if ch in found[kind]:
            continue
        path_col = f"PathName_{name}" if m.group(1) == "FileName" and f"PathName_{name}" in df else ""
        found[kind][ch] = {"file": col, "path": path_col}
    return found


def _full_paths(df: pd.DataFrame, cols: dict[str, str], folder: Path) -> list[str]:
    """Absolute paths of one channel's files: ``FileName`` joined to ``PathName``, relative to ``folder``."""
    files = df[cols["file"]].astype(str).tolist()
    if cols["path"]:
        files = [str(Path(b) / f) for b, f in zip(df[cols["path"]].astype(str), files)]
    return [p if Path(p).is_absolute() else str((folder / p).resolve()) for p in files]


def read_image_table(path: str | Path, plate: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """One row per field with one file per channel.

    Accepted channel columns: ``Path_<Channel>`` (a full path) or CellProfiler's
    ``FileName_<Channel>`` with ``PathName_<Channel>``; CellProfiler's ``Orig`` prefix is dropped
    (``FileName_OrigDNA`` -> channel ``DNA``). ``FileName_Illum<Channel>`` with
    ``PathName_Illum<Channel>`` (``load_data_with_illum.csv``) are the channels' illumination
    functions, not channels. Relative paths are taken relative to the table's folder. Keys:
    ``Metadata_Plate`` (or ``plate``), ``Metadata_Well`` (``A01``/``A1``), ``Metadata_Site`` (or
    ``Metadata_Field``; numbered 1.. within a well when absent).

    Returns
    -------
    table : DataFrame with Metadata_Plate, Metadata_Well, Metadata_Site, ``Path_<Channel>`` and,
        when every channel has one, ``Illum_<Channel>`` (the illumination function's file)
    channels : list of channel names, in column order
    """
    path = Path(path)
    df = read_table(path)
    df = _rename_first(_rename_first(df, _WELL_ALIASES, "Metadata_Well"), _PLATE_ALIASES, "Metadata_Plate")
    df = _rename_first(df, ("Metadata_Site", "Metadata_Field", "Site", "site", "Field"), "Metadata_Site")
    if "Metadata_Well" not in df:
        raise InputError(path, "no well column (Metadata_Well)")
    if "Metadata_Plate" not in df:
        if plate is None:
            raise InputError(path, "no plate column (Metadata_Plate) and no plate name given")
        df["Metadata_Plate"] = plate
    found = _channel_columns(df)
    channels = list(found["image"])
    if not channels:
        raise InputError(path, "no channel columns (Path_<Channel> or FileName_<Channel> + PathName_<Channel>)")
    illum = found["illum"]
    if illum and set(illum) != set(channels):
        raise InputError(path, f"illumination columns for {sorted(illum)} but the channels are {channels}: "
                               "every channel needs its FileName_Illum<Channel> / PathName_Illum<Channel>, or none")
    table = pd.DataFrame({"Metadata_Plate": df["Metadata_Plate"].astype(str),
                          "Metadata_Well": [normalize_well(w, f"{path}, row {i + 1}") for i, w in
                                            enumerate(df["Metadata_Well"])]})
    if "Metadata_Site" in df:
        table["Metadata_Site"] = pd.to_numeric(df["Metadata_Site"], errors="raise").astype(int)
    else:
        table["Metadata_Site"] = table.groupby(["Metadata_Plate", "Metadata_Well"]).cumcount() + 1
    for ch in channels:
        table[f"Path_{ch}"] = _full_paths(df, found["image"][ch], path.parent)
    for ch in channels if illum else ():
        table[f"Illum_{ch}"] = _full_paths(df, illum[ch], path.parent)
    return table, channels


def read_platemap(path: str | Path) -> pd.DataFrame:
    """A plate map: well (and optionally plate) -> perturbation metadata, all ``Metadata_`` columns.

    ``Metadata_pert_type`` values should be ``trt``, ``negcon`` or ``poscon``; common
    spellings (``control``, ``negative_control``, ``DMSO``) are not guessed: a map without
    the column is accepted, but sphering will then need the controls named explicitly.
    """
    path = Path(path)
    df = read_table(path)
    df = _rename_first(_rename_first(df, _WELL_ALIASES, "Metadata_Well"), _PLATE_ALIASES, "Metadata_Plate")
    if "Metadata_Well" not in df:
        raise InputError(path, f"plate map has no well column (one of {', '.join(_WELL_ALIASES)})")
    df = with_metadata_prefix(df)
    df["Metadata_Well"] = [normalize_well(w, f"{path}, row {i + 1}") for i, w in enumerate(df["Metadata_Well"])]
    keys = ["Metadata_Plate", "Metadata_Well"] if "Metadata_Plate" in df else ["Metadata_Well"]
    dup = df.duplicated(keys, keep=False)
    if dup.any():
        wells = ", ".join(sorted(set(df.loc[dup, "Metadata_Well"])))[:200]
        raise InputError(path, f"plate map lists these wells more than once: {wells}")
    if "Metadata_Plate" in df:
        df["Metadata_Plate"] = df["Metadata_Plate"].astype(str)
    return df


def join_platemap(wells: pd.DataFrame, platemap: pd.DataFrame | None) -> tuple[pd.DataFrame, list[dict]]:
    """Left-join well rows to the plate map.

    Returns
    -------
    joined : DataFrame
        ``wells`` with the plate map's columns (wells missing from the map keep NaN there).
    problems : list of dict
        ``{"Metadata_Plate", "Metadata_Well", "reason"}`` for wells missing from the map and
        map wells with no images.
    """
    if platemap is None:
        return wells, []
    keys = ["Metadata_Plate", "Metadata_Well"] if "Metadata_Plate" in platemap else ["Metadata_Well"]
    extra = [c for c in platemap.columns if c not in keys and c in wells.columns]
    pm = platemap.drop(columns=extra)
    joined = wells.merge(pm, on=keys, how="left", indicator=True)
    problems = [{"Metadata_Plate": r.Metadata_Plate, "Metadata_Well": r.Metadata_Well,
                 "reason": "well is not in the plate map"}
                for r in joined.loc[joined["_merge"] == "left_only", ["Metadata_Plate", "Metadata_Well"]]
                .itertuples(index=False)]
    seen = wells[keys].drop_duplicates()
    plates = sorted(set(wells["Metadata_Plate"]))
    pm_rows = platemap if "Metadata_Plate" in platemap else pd.concat(
        [platemap.assign(Metadata_Plate=p) for p in plates], ignore_index=True)
    pm_rows = pm_rows[pm_rows["Metadata_Plate"].isin(plates)]
    absent = pm_rows.merge(seen.assign(_seen=1),
                           on=keys, how="left")
    for r in absent.loc[absent["_seen"].isna(), ["Metadata_Plate", "Metadata_Well"]].itertuples(index=False):
        problems.append({"Metadata_Plate": r.Metadata_Plate, "Metadata_Well": r.Metadata_Well,
                         "reason": "well is in the plate map but has no profile (no images, or every site skipped)"})
    return joined.drop(columns="_merge"), problems


def read_cell_array(images: str | Path, table: str | Path | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """Pre-cropped single cells with plate metadata (imaging flow cytometry, crop collections).

    Parameters
    ----------
    images : path
        ``.npz`` (key ``images``) or ``.npy`` of shape (N, C, h, w), h, w <= 224.
    table : path, optional
        CSV/Parquet with N rows: ``Metadata_Plate``, ``Metadata_Well``, optionally
        ``Metadata_Site`` and ``Metadata_ObjectNumber`` (default: a ``cells.csv`` beside).

    Returns
    -------
    images : ndarray (N, C, h, w)
    metadata : DataFrame, N rows with Metadata_Plate/Well/Site/ObjectNumber
    """
    images = Path(images)
    if table is None:
        table = images.with_name("cells.csv")
    from .arrays import load_array

    arr = load_array(images)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise InputError(images, f"cell array has shape {arr.shape}; expected (N, C, h, w)")
    meta = with_metadata_prefix(read_table(table))
    if len(meta) != len(arr):
        raise InputError(table, f"{len(meta)} rows but {len(arr)} cells in {images.name}")
    for col in ("Metadata_Plate", "Metadata_Well"):
        if col not in meta:
            raise InputError(table, f"missing column {col}")
    meta["Metadata_Plate"] = meta["Metadata_Plate"].astype(str)
    meta["Metadata_Well"] = [normalize_well(w, str(table)) for w in meta["Metadata_Well"]]
    if "Metadata_Site" not in meta:
        meta["Metadata_Site"] = 1
    if "Metadata_ObjectNumber" not in meta:
        meta["Metadata_ObjectNumber"] = meta.groupby(["Metadata_Plate", "Metadata_Well", "Metadata_Site"]).cumcount() + 1
    return arr, meta.reset_index(drop=True)


def parse_file_names(folder: str | Path, pattern: str) -> pd.DataFrame:
    """Match every file in ``folder`` against a regular expression with named groups.

    Groups: ``well`` (or ``row`` and ``column``), optionally ``site`` and ``channel``;
    e.g. ``r"(?P<well>[A-P]\\d{2})f(?P<site>\\d+)d(?P<channel>\\d)\\.TIF"``. Files that do not
    match are ignored (and logged).

    Returns
    -------
    DataFrame with Metadata_Well, Metadata_Site, Metadata_Channel and ``path``.
    """
    folder = Path(folder)
    rx = re.compile(pattern)
    rows = []
    for p in sorted(folder.iterdir()):
        m = rx.fullmatch(p.name) or rx.search(p.name)
        if not m:
            log.info("convert: %s does not match the pattern; ignored", p.name)
            continue
        g = m.groupdict()
        well = g.get("well") or f"{g['row']}{g['column']}"
        rows.append({"Metadata_Well": normalize_well(well, str(p)), "Metadata_Site": int(g.get("site") or 0),
                     "Metadata_Channel": g.get("channel") or "0", "path": str(p)})
    if not rows:
        raise InputError(folder, f"no file name matches the pattern {pattern!r}")
    df = pd.DataFrame(rows)
    sites = sorted(df["Metadata_Site"].unique())
    if sites and sites[0] == 0:  # 0-based sites (f00) -> 1-based
        df["Metadata_Site"] += 1
    return df
