"""Aggregation of profiles: cell -> site -> well -> treatment (pure functions on DataFrames).

Works on pandas DataFrames, and on dask DataFrames where a screen's cell table does not
fit in memory (the result, one row per group, is returned as pandas).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from .controls import negative_controls

METHODS = ("mean", "median")
COUNT = "Metadata_Object_Count"
SITE_KEYS = ["Metadata_Batch", "Metadata_Plate", "Metadata_Well", "Metadata_Site"]
WELL_KEYS = ["Metadata_Batch", "Metadata_Plate", "Metadata_Well"]
TREATMENT_KEYS = ["Metadata_Compound", "Metadata_Concentration"]


def feature_columns(df) -> list[str]:
    """Every column that is not metadata (does not start with ``Metadata_``)."""
    return [c for c in df.columns if not str(c).startswith("Metadata_")]


def _is_dask(df) -> bool:
    return type(df).__module__.startswith("dask")


def aggregate(df, by: Sequence[str], method: str = "mean", features: Sequence[str] | None = None,
              keep_constant_metadata: bool = True) -> pd.DataFrame:
    """Aggregate profiles over groups.

    Parameters
    ----------
    df : pandas or dask DataFrame
        Metadata columns (``Metadata_*``) and float features.
    by : sequence of str
        Group keys, e.g. ``["Metadata_Plate", "Metadata_Well"]``.
    method : {"mean", "median"}
    features : sequence of str, optional
        Default: every non-metadata column.
    keep_constant_metadata : bool
        Keep the other metadata columns whose value is constant within every group
        (e.g. the compound of a well).

    Returns
    -------
    DataFrame
        One row per group: keys, constant metadata, ``Metadata_Object_Count`` (the sum of
        the input's counts, or the number of input rows), then float32 features.
    """
    if method not in METHODS:
        raise ValueError(f"aggregation method must be one of {METHODS}, not {method!r}")
    by = list(by)
    missing = [k for k in by if k not in df.columns]
    if missing:
        raise ValueError(f"cannot aggregate: missing key column(s) {missing}")
    features = list(features) if features is not None else feature_columns(df)
    grouped = df.groupby(by, sort=True, dropna=False)
    values = grouped[features].mean() if method == "mean" else grouped[features].median()
    counts = grouped[COUNT].sum() if COUNT in df.columns else grouped.size()
    meta_cols = [c for c in df.columns if str(c).startswith("Metadata_") and c not in by and c != COUNT]
    if _is_dask(df):
        values, counts = values.compute(), counts.compute()
        if keep_constant_metadata and meta_cols:
            nunique = pd.DataFrame({c: grouped[c].nunique().compute() for c in meta_cols})
            firsts = grouped[meta_cols].first().compute()
    elif keep_constant_metadata and meta_cols:
        nunique = grouped[meta_cols].nunique(dropna=False)
        firsts = grouped[meta_cols].first()
    out = pd.DataFrame(index=values.index)
    if keep_constant_metadata and meta_cols:
        for c in meta_cols:
            if (nunique[c] <= 1).all():
                out[c] = firsts[c]
    out[COUNT] = np.asarray(counts.reindex(values.index), dtype=np.int64)
    out = out.reset_index()
    feats = values[features].to_numpy(dtype=np.float32)
    return pd.concat([out, pd.DataFrame(feats, columns=features)], axis=1)


def treatment_profiles(wells: pd.DataFrame, keys: Sequence[str] = TREATMENT_KEYS, method: str = "mean",
                       include_controls: bool = False) -> pd.DataFrame:
    """Consensus profiles per treatment (compound + concentration by default).

    Negative controls (:func:`~microsnoop_ray.profiles.controls.negative_controls`) are not treatments and are left
    out unless ``include_controls``. Adds ``Metadata_Well_Count``.
    """
    df = wells
    if not include_controls:
        df = df[~negative_controls(df)]
    missing = [k for k in keys if k not in df.columns]
    if missing:
        raise ValueError(f"cannot build treatment profiles: missing column(s) {missing} (join a plate map)")
    n_wells = df.groupby(list(keys), dropna=False).size().rename("Metadata_Well_Count").reset_index()
    drop = [c for c in ("Metadata_Well", "Metadata_Site", "Metadata_Row", "Metadata_Column") if c in df]
    out = aggregate(df.drop(columns=drop), keys, method)
    out = out.merge(n_wells, on=list(keys), how="left")
    feats = feature_columns(out)
    meta = [c for c in out.columns if c not in feats]
    return out[meta + feats]
