"""Writing Parquet profiles: atomic files, float32 features, provenance in the schema."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path

#: Key under which provenance (model card, options) is stored in the Parquet schema metadata.
SCHEMA_KEY = b"microsnoop_ray"


def profile_table(metadata: pd.DataFrame, features: np.ndarray, feature_names: Sequence[str]) -> pa.Table:
    """Join metadata columns and a float32 feature matrix into an Arrow table.

    Parameters
    ----------
    metadata : DataFrame, n rows; every column must start with ``Metadata_``
    features : ndarray, shape (n, d)
    feature_names : sequence of d str
    """
    bad = [c for c in metadata.columns if not str(c).startswith("Metadata_")]
    if bad:
        raise ValueError(f"metadata columns must start with 'Metadata_': {bad}")
    features = np.asarray(features, dtype=np.float32)
    if features.shape != (len(metadata), len(feature_names)):
        raise ValueError(f"features {features.shape} do not match {len(metadata)} rows x {len(feature_names)} names")
    meta = pa.Table.from_pandas(metadata.reset_index(drop=True), preserve_index=False)
    cols = [pa.array(features[:, j]) for j in range(features.shape[1])]
    feat = pa.Table.from_arrays(cols, names=list(feature_names)) if cols else None
    if feat is None:
        return meta
    for name, col in zip(feat.column_names, feat.columns):
        meta = meta.append_column(name, col)
    return meta


def arrow_table(df: pd.DataFrame) -> pa.Table:
    """``pa.Table.from_pandas(df, preserve_index=False)`` without its schema metadata, for wide tables.

    Arrow's pandas conversion costs about 0.15 ms per column (a pandas lookup and metadata for each),
    so a site's 768 to 2,304 feature columns took over 100 ms: most of what an encoder actor spends
    on a site outside the network. Numeric columns are converted one dtype block at a time instead;
    the others (strings) go through pandas as before. The types and values are from_pandas's (NaN in
    a float column becomes null).

    Parameters
    ----------
    df : DataFrame with unique string column names (anything else is converted by from_pandas)
    """
    if len(df.columns) == 0 or not df.columns.is_unique or not all(isinstance(c, str) for c in df.columns):
        return pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(None)
    arrays: dict[str, pa.ChunkedArray | pa.Array] = {}
    dtypes = df.dtypes
    for dtype in dtypes.unique():
        cols = list(dtypes.index[dtypes == dtype])
        if isinstance(dtype, np.dtype) and dtype.kind in "fiub":
            block = np.ascontiguousarray(df[cols].to_numpy().T)
            arrays.update((name, pa.array(values, from_pandas=True)) for name, values in zip(cols, block))
        else:
            part = pa.Table.from_pandas(df[cols], preserve_index=False)
            arrays.update((name, part.column(name)) for name in cols)
    return pa.table({name: arrays[name] for name in df.columns})


def write_parquet(table: pa.Table | pd.DataFrame, path: str | os.PathLike, provenance: Mapping | None = None) -> Path:
    """Write atomically (temporary file, then rename), so a reader never sees half a file.

    ``provenance`` is stored as JSON in the schema metadata under ``microsnoop_ray``
    and read back by :func:`read_provenance`. The pandas and Arrow-schema footer keys are
    left out: they repeat every column name (for 768 features, most of a small file) and
    carry nothing a reader of these plain tables (no index, no categoricals) needs.
    """
    table = arrow_table(table) if isinstance(table, pd.DataFrame) else table.replace_schema_metadata(None)
    path = Path(path)
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, table.schema, store_schema=False) as writer:
        writer.write_table(table)
        if provenance is not None:
            writer.add_key_value_metadata({SCHEMA_KEY: json.dumps(provenance, default=str).encode()})
    return path


def read_provenance(path: str | os.PathLike) -> dict:
    """The provenance dict stored by :func:`write_parquet` (empty if none)."""
    md = pq.read_schema(path).metadata or {}
    raw = md.get(SCHEMA_KEY)
    return json.loads(raw) if raw else {}
