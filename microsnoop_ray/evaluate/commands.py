"""What ``microsnoop-ray evaluate <metric>`` computes on one profile table (pure functions on DataFrames).

Each function takes a table of ``Metadata_*`` columns and features and returns a JSON-ready
summary plus the labels to colour its picture by.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import InputError
from ..profiles.aggregate import feature_columns, treatment_profiles
from ..profiles.sphering import DEFAULT_REGULARIZATION, sphere_profiles
from .mapping import activity_map, consistency_map
from .metrics import knn_accuracy, mlp_accuracy, silhouette
from .nsc import nsc_nscb, treatment_batches
from .report import write_report
from .suites import SUITES, run_suite, table_markdown
from ..profiles.controls import negative_controls


def _columns(df: pd.DataFrame, cols: Sequence[str], where: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        meta = [c for c in df.columns if str(c).startswith("Metadata_")]
        raise InputError(where, f"no column(s) {missing}; metadata columns are {meta}")


def _features(df: pd.DataFrame, where: str) -> np.ndarray:
    feats = feature_columns(df)
    if not feats:
        raise InputError(where, "no feature columns (every column starts with Metadata_)")
    X = df[feats].to_numpy(np.float64)
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise InputError(where, f"{int(bad.sum())} row(s) have NaN or infinite features, e.g. row {int(np.argmax(bad))}")
    return X


def _labelled(df: pd.DataFrame, label: str, where: str) -> tuple[np.ndarray, np.ndarray, int]:
    _columns(df, [label], where)
    keep = df[label].notna().to_numpy()
    return _features(df[keep], where), df.loc[keep, label].astype(str).to_numpy(), int((~keep).sum())


def evaluate_knn(df: pd.DataFrame, label: str, k: int = 11, metric: str = "euclidean",
                 where: str = "table") -> tuple[dict, np.ndarray, np.ndarray]:
    """Leave-one-out kNN of ``label`` (docs/METHOD.md vote rule). Returns summary, features, labels."""
    X, y, dropped = _labelled(df, label, where)
    res = knn_accuracy(X, y, k, metric)
    return {**res, "metric": "knn", "distance": res["metric"], "label": label, "rows_without_label": dropped}, X, y


def evaluate_mlp(df: pd.DataFrame, label: str, folds: int = 5, seed: int = 0,
                 where: str = "table") -> tuple[dict, np.ndarray, np.ndarray]:
    """Stratified k-fold MLP accuracy of ``label``."""
    X, y, dropped = _labelled(df, label, where)
    try:
        res = mlp_accuracy(X, y, folds=folds, seed=seed)
    except ValueError as exc:
        raise InputError(where, str(exc)) from None
    return {"metric": "mlp", "label": label, **res, "rows_without_label": dropped}, X, y


def evaluate_silhouette(df: pd.DataFrame, label: str, metric: str = "cosine",
                        where: str = "table") -> tuple[dict, np.ndarray, np.ndarray]:
    """Silhouette score of the ``label`` groups."""
    X, y, dropped = _labelled(df, label, where)
    try:
        s = silhouette(X, y, metric)
    except ValueError as exc:
        raise InputError(where, str(exc)) from None
    return {"metric": "silhouette", "label": label, "distance": metric, "silhouette": s, "n": int(len(y)),
            "rows_without_label": dropped}, X, y


def evaluate_nsc(df: pd.DataFrame, moa: str = "Metadata_moa", compound: str = "Metadata_Compound",
                 concentration: str = "Metadata_Concentration", batch_rule: str = "batch", sphere: str = "none",
                 metric: str = "cosine", where: str = "table", regularization: str = DEFAULT_REGULARIZATION,
                 epsilon: float | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """NSC and NSCB. ``df`` holds either treatment profiles (one row per compound and concentration,
    with ``Metadata_Batch`` or ``Metadata_Plate`` for the batch rule) or well profiles, which are first
    sphered on their negative controls (``sphere`` scope; ``none`` keeps them) and averaged per
    treatment (``regularization`` and ``epsilon`` as :func:`~microsnoop_ray.profiles.sphering.fit_sphering`;
    the fits' diagnostics are in the summary). Negative controls (``Metadata_pert_type == negcon``, or the
    compound DMSO) are never treatments."""
    keys = [compound, concentration]
    _columns(df, [moa] + keys, where)
    _features(df, where)
    col = "Metadata_Batch" if batch_rule == "batch" else "Metadata_Plate"
    _columns(df, [col], where)
    fits = []
    if sphere != "none":
        try:
            df, fits = sphere_profiles(df, scope=sphere, regularization=regularization, epsilon=epsilon)
        except ValueError as exc:
            raise InputError(where, str(exc)) from None
    # BBBC021 tables name the vehicle but may lack Metadata_pert_type: DMSO wells are its controls
    control = negative_controls(df) if "Metadata_pert_type" in df else \
        df[compound].astype(str).str.upper().eq("DMSO").to_numpy()
    trt = df[~control]
    batches = treatment_batches(trt, keys, batch_rule)
    if trt.duplicated(keys).any():
        treat = treatment_profiles(trt, keys, "mean")
        moas = trt.groupby(keys, dropna=False)[moa].agg(lambda s: "|".join(sorted(set(map(str, s)))))
        treat = treat.drop(columns=[moa], errors="ignore").merge(moas.reset_index(), on=keys)
        level = "wells, averaged per treatment"
    else:
        treat, level = trt, "treatment profiles"
    treat = treat.drop(columns=["Metadata_NSCB_Batch"], errors="ignore").merge(batches, on=keys)
    res = nsc_nscb(treat, moa, compound, "Metadata_NSCB_Batch", metric)
    summary = {"metric": "nsc", "input": level, "sphering": sphere, "batch_rule": batch_rule, "distance": metric,
               "treatments": int(len(treat)), "control_rows_left_out": int(control.sum()), **res,
               "sphering_fits": fits}
    return summary, treat[feature_columns(treat)].to_numpy(np.float64), treat[moa].astype(str).to_numpy()


def evaluate_map(df: pd.DataFrame, pert: Sequence[str], question: str = "activity", same_plate: bool = True,
                 null_size: int = 10000, seed: int = 0, where: str = "table") -> tuple[dict, np.ndarray, np.ndarray]:
    """copairs mAP: ``activity`` (replicates vs negative controls) or ``consistency`` (replicates vs
    other perturbations)."""
    _columns(df, list(pert) + (["Metadata_Plate"] if question == "activity" and same_plate else []), where)
    X = _features(df, where)
    try:
        if question == "activity":
            res = activity_map(df, list(pert), same_plate=same_plate, null_size=null_size, seed=seed)
        elif question == "consistency":
            res = consistency_map(df, list(pert), null_size=null_size, seed=seed)
        else:
            raise ValueError(f"question must be 'activity' or 'consistency', not {question!r}")
    except ValueError as exc:
        raise InputError(where, str(exc)) from None
    labels = df[list(pert)].astype(str).agg(" ".join, axis=1).to_numpy()
    if "Metadata_pert_type" in df:
        labels = np.where(negative_controls(df), "negative control", labels)
    return {"metric": "map", **res}, X, labels


def headline(s: dict) -> str:
    """One line of an evaluation summary (the command prints it when the JSON goes to a file)."""
    if s["metric"] == "nsc":
        return (f"NSC {s['nsc']['correct']}/{s['nsc']['total']} ({s['nsc']['accuracy']:.3f}), "
                f"NSCB {s['nscb']['correct']}/{s['nscb']['total']} ({s['nscb']['accuracy']:.3f})")
    if s["metric"] == "map":
        return f"mean mAP {s['mean_map']:.3f}, fraction retrieved {s['fraction_retrieved']:.3f} ({s['n_groups']} groups)"
    if s["metric"] == "silhouette":
        return f"silhouette {s['silhouette']:.3f} ({s['n']} rows)"
    extra = f" ± {s['sd']:.3f}" if "sd" in s else ""
    return f"{s['metric']} accuracy {s['accuracy']:.3f}{extra}, macro F1 {s['macro_f1']:.3f} ({s['n']} rows)"


def run_suites(which: str, data, out, methods, weights=None, log=print, per_class: int = 100, per_well: int = 40,
               seed: int = 0, null_size: int = 10000, show=print):
    """Run the suites named in ``which`` (comma-separated, or ``all``), ``show`` each one's table, and
    write the report; returns the report's Markdown path. Raises ValueError naming a failed suite."""
    names = list(SUITES) if which == "all" else which.split(",")
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; choose from {sorted(SUITES)} or 'all'")
    opts = {"mlcp-cellcycle": {"per_class": per_class, "seed": seed},
            "bbbc021-chx": {"per_well": per_well, "seed": seed, "null_size": null_size},
            "bbbc021-cp-profiles": {"seed": seed},
            "lincs-plate": {"seed": seed, "null_size": null_size}}
    for name in names:
        try:
            doc = run_suite(name, Path(data), Path(out), methods, weights, log=log, **opts[name])
        except ValueError as exc:
            raise ValueError(f"suite {name}: {exc}") from None
        show(f"\n## {name}\n")
        show(table_markdown(doc))
    md, _ = write_report(out)
    return md
