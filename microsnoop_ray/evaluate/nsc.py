"""BBBC021 mechanism-of-action matching: NSC and NSCB (docs/METHOD.md section 6).

NSC ("not same compound"): for every treatment profile, the nearest other treatment profile
(1-NN, cosine) among treatments of a *different compound*; correct when it has the same MoA.
NSCB ("not same compound or batch"): also exclude treatments that share a batch with it, after
dropping the MoAs that occur in one batch only (on BBBC021: Cholesterol-lowering and Kinase
inhibitors, which leaves 92 of the 103 treatments).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..profiles.aggregate import feature_columns

BATCH_RULES = ("batch", "plate")


def treatment_batches(wells: pd.DataFrame, keys: Sequence[str] = ("Metadata_Compound", "Metadata_Concentration"),
                      rule: str = "batch") -> pd.DataFrame:
    """The batch label of every treatment, from its wells.

    Parameters
    ----------
    wells : DataFrame
        One row per well with ``keys`` and ``Metadata_Batch`` (rule ``batch``: the week on
        BBBC021) or ``Metadata_Plate`` (rule ``plate``).
    rule : {"batch", "plate"}
        ``batch``: a treatment's batches are the batches of its wells (week-level, the default).
        ``plate``: the plate-string rule of the reference code, where every plate is its own
        batch; two treatments then share a batch when they share a plate.

    Returns
    -------
    DataFrame with ``keys`` and ``Metadata_NSCB_Batch``: the sorted batch labels joined by ``|``.
    """
    if rule not in BATCH_RULES:
        raise ValueError(f"batch rule must be one of {BATCH_RULES}, not {rule!r}")
    col = "Metadata_Batch" if rule == "batch" else "Metadata_Plate"
    if col not in wells:
        raise ValueError(f"batch rule {rule!r} needs a {col} column")
    out = wells.groupby(list(keys), dropna=False)[col].agg(lambda s: "|".join(sorted(set(map(str, s)))))
    return out.rename("Metadata_NSCB_Batch").reset_index()


def _similarity(X: np.ndarray, metric: str) -> np.ndarray:
    X = np.asarray(X, np.float64)
    if metric == "cosine":
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        return X @ X.T
    if metric == "euclidean":
        sq = (X ** 2).sum(1)
        return -np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * X @ X.T, 0))
    raise ValueError(f"metric must be 'cosine' or 'euclidean', not {metric!r}")


def not_same_compound(treatments: pd.DataFrame, moa: str = "Metadata_moa", compound: str = "Metadata_Compound",
                      batch: str | None = None, metric: str = "cosine",
                      features: Sequence[str] | None = None) -> dict:
    """1-NN MoA matching that never matches a treatment to its own compound (NSC), or to its own batch (NSCB).

    Parameters
    ----------
    treatments : DataFrame
        One row per treatment: ``moa``, ``compound``, optionally ``batch`` (``|``-joined labels:
        treatments whose label sets intersect share a batch) and the feature columns.
    batch : str, optional
        Give it for NSCB: MoAs that occur in one batch only are dropped first.
    metric : {"cosine", "euclidean"}
    features : list of str, optional
        Default: every non-``Metadata_`` column.

    Returns
    -------
    dict
        ``correct``, ``total``, ``accuracy``, ``dropped_moas`` (NSCB), ``unmatched`` (treatments with
        no admissible neighbour, counted as wrong) and ``failed``: one record per wrong treatment
        with its nearest admissible neighbour. Ties go to the first row in table order.
    """
    df = treatments.reset_index(drop=True)
    feats = list(features) if features is not None else feature_columns(df)
    dropped: list[str] = []
    if batch is not None:
        sets = df[batch].astype(str).str.split("|").map(frozenset)
        per_moa = {m: frozenset().union(*sets[df[moa] == m]) for m in df[moa].unique()}
        dropped = sorted(str(m) for m, b in per_moa.items() if len(b) < 2)
        keep = ~df[moa].isin(dropped)
        df, sets = df[keep].reset_index(drop=True), sets[keep].reset_index(drop=True)
    S = _similarity(df[feats].to_numpy(np.float64), metric)
    comp = df[compound].to_numpy()
    allowed = comp[:, None] != comp[None, :]
    if batch is not None:
        s = sets.tolist()
        allowed &= np.array([[a.isdisjoint(b) for b in s] for a in s])
    S = np.where(allowed, S, -np.inf)
    nn = np.argmax(S, axis=1)  # first maximum
    has = allowed.any(axis=1)
    moas = df[moa].to_numpy()
    ok = has & (moas[nn] == moas)
    key_cols = [c for c in df.columns if c.startswith("Metadata_")]
    failed = []
    for i in np.flatnonzero(~ok):
        rec = {c: _plain(df.at[i, c]) for c in key_cols}
        if has[i]:
            rec["nearest_compound"] = _plain(comp[nn[i]])
            rec["nearest_moa"] = _plain(moas[nn[i]])
            rec["similarity"] = float(S[i, nn[i]]) if metric == "cosine" else float(-S[i, nn[i]])
        failed.append(rec)
    return {"correct": int(ok.sum()), "total": int(len(df)), "accuracy": float(ok.mean()) if len(df) else float("nan"),
            "metric": metric, "dropped_moas": dropped, "unmatched": int((~has).sum()), "failed": failed}


def nsc_nscb(treatments: pd.DataFrame, moa: str = "Metadata_moa", compound: str = "Metadata_Compound",
             batch: str = "Metadata_NSCB_Batch", metric: str = "cosine") -> dict:
    """NSC and NSCB of the same treatment profiles: ``{"nsc": {...}, "nscb": {...}}``."""
    return {"nsc": not_same_compound(treatments, moa, compound, None, metric),
            "nscb": not_same_compound(treatments, moa, compound, batch, metric)}


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v
