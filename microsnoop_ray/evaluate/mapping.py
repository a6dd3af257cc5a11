"""Mean average precision with copairs (the maintained implementation, called, not rewritten).

Two questions, with the JUMP defaults (cosine similarity, null size 10,000, Benjamini-Hochberg
corrected p < 0.05 counts as retrieved):

* **activity**: are a perturbation's replicates closer to each other than to the negative
  controls (on the same plate by default)? Positives: same perturbation; negatives: the
  negative controls. Controls are never positives of each other.
* **consistency / replicate retrieval**: are a perturbation's replicates closer to each other than
  to other perturbations? Controls are left out.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd

from ..profiles.aggregate import feature_columns
from ..profiles.controls import negative_controls

REF = "Metadata_copairs_reference"
#: one column naming the perturbation: copairs' ``diffby`` asks *every* column to differ, and two
#: treatments of one dose (same concentration) must still be each other's negatives
PERT = "Metadata_copairs_perturbation"


def _joined(df: pd.DataFrame, perts: list[str]) -> tuple[pd.Series, dict]:
    """The perturbation columns as one string column, and each joined value's original values."""
    joined = df[perts].astype(str).agg(" | ".join, axis=1)
    return joined, {j: dict(zip(perts, vals)) for j, vals in zip(joined, df[perts].itertuples(index=False))}


def _named(per_group: list[dict], names: dict) -> list[dict]:
    """copairs' per-group rows with the perturbation's own columns instead of the joined one."""
    return [{**names.get(g[PERT], {}), **{k: v for k, v in g.items() if k != PERT}} for g in per_group]


def _run(meta: pd.DataFrame, feats: np.ndarray, pos_sameby, pos_diffby, neg_sameby, neg_diffby, group_by,
         null_size: int, threshold: float, seed: int) -> dict:
    from copairs.map import average_precision, mean_average_precision

    logging.getLogger("copairs").setLevel(logging.WARNING)
    ap = average_precision(meta, feats, pos_sameby=list(pos_sameby), pos_diffby=list(pos_diffby),
                           neg_sameby=list(neg_sameby), neg_diffby=list(neg_diffby), distance="cosine",
                           progress_bar=False)
    ap = ap[ap["n_pos_pairs"] > 0].dropna(subset=["average_precision"])
    maps = mean_average_precision(ap, list(group_by), null_size=null_size, threshold=threshold, seed=seed,
                                  progress_bar=False)
    return {"mean_map": float(maps["mean_average_precision"].mean()),
            "fraction_retrieved": float(maps["below_corrected_p"].mean()),
            "n_groups": int(len(maps)), "n_profiles": int(len(ap)),
            "null_size": null_size, "threshold": threshold,
            "per_group": maps[list(group_by) + ["mean_average_precision", "corrected_p_value",
                                                "below_corrected_p"]].to_dict("records")}


def activity_map(profiles: pd.DataFrame, pert: str | Sequence[str] = "Metadata_Compound",
                 controls: np.ndarray | pd.Series | None = None, same_plate: bool = True,
                 plate: str = "Metadata_Plate", null_size: int = 10000, threshold: float = 0.05,
                 seed: int = 0, features: Sequence[str] | None = None) -> dict:
    """mAP of each perturbation's replicates against negative controls (phenotypic activity).

    Parameters
    ----------
    profiles : DataFrame
        One row per replicate profile (well or site): ``Metadata_*`` columns and features.
    pert : str or list of str
        The column(s) naming a perturbation (e.g. compound and concentration).
    controls : boolean mask, optional
        Negative-control rows; default ``Metadata_pert_type`` in {negcon, control}.
    same_plate : bool
        Negatives are the controls of the same plate (the JUMP default); otherwise any control.

    Returns
    -------
    dict: ``mean_map`` (over perturbations), ``fraction_retrieved`` (corrected p < threshold),
    ``n_groups``, ``per_group``.
    """
    perts = [pert] if isinstance(pert, str) else list(pert)
    df = profiles.reset_index(drop=True)
    if controls is None:
        if "Metadata_pert_type" not in df:
            raise ValueError("no Metadata_pert_type column: pass controls= to say which rows are negative controls")
        controls = negative_controls(df)
    controls = np.asarray(controls, bool)
    named = df[perts].notna().all(axis=1).to_numpy() | controls  # a treatment without a name is no replicate
    df, controls = df[named].reset_index(drop=True), controls[named]
    if not controls.any():
        raise ValueError("no negative-control profiles: activity mAP needs them")
    feats = list(features) if features is not None else feature_columns(df)
    meta = df[[plate] if same_plate else []].copy()
    meta[PERT], names = _joined(df, perts)
    meta.loc[controls, PERT] = "__control__"
    meta[REF] = np.where(controls, np.arange(len(df)), -1)
    res = _run(meta, df[feats].to_numpy(np.float64), pos_sameby=[PERT, REF], pos_diffby=[],
               neg_sameby=[plate] if same_plate else [], neg_diffby=[PERT, REF],
               group_by=[PERT], null_size=null_size, threshold=threshold, seed=seed)
    res["per_group"] = _named([g for g in res["per_group"] if g[PERT] != "__control__"], names)
    return {"question": "activity (replicates vs negative controls)", "same_plate_negatives": same_plate, **res}


def consistency_map(profiles: pd.DataFrame, pert: str | Sequence[str] = "Metadata_Compound",
                    controls: np.ndarray | pd.Series | None = None, null_size: int = 10000,
                    threshold: float = 0.05, seed: int = 0, features: Sequence[str] | None = None,
                    pos_diffby: Sequence[str] = ()) -> dict:
    """mAP of replicate retrieval among perturbations (controls left out): positives are replicates of
    the same perturbation, negatives are profiles of other perturbations. Same return as
    :func:`activity_map`.

    ``pos_diffby`` makes positives differ in these columns: for MoA consistency, pass the compound
    column so that doses of one compound are not each other's positives."""
    perts = [pert] if isinstance(pert, str) else list(pert)
    df = profiles.reset_index(drop=True)
    if controls is None and "Metadata_pert_type" in df:
        controls = negative_controls(df)
    if controls is not None:
        df = df[~np.asarray(controls, bool)]
    df = df[df[perts].notna().all(axis=1)].reset_index(drop=True)
    feats = list(features) if features is not None else feature_columns(df)
    meta = df[list(pos_diffby)].astype(str)
    meta[PERT], names = _joined(df, perts)
    res = _run(meta, df[feats].to_numpy(np.float64), pos_sameby=[PERT], pos_diffby=list(pos_diffby), neg_sameby=[],
               neg_diffby=[PERT], group_by=[PERT], null_size=null_size, threshold=threshold, seed=seed)
    res["per_group"] = _named(res["per_group"], names)
    return {"question": "replicate retrieval (replicates vs other perturbations)", **res}
