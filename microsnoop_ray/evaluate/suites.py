"""Named benchmark suites on the data sets of ``../shared/data`` (see its README for provenance).

Every suite runs each method on the *same* inputs and returns one result document:

``mlcp-cellcycle``
    Jurkat cells (Blasi et al. 2016), Experiment_1, up to ``per_class`` cells per phase.
    7-class (G1, S, G2, Prophase, Metaphase, Anaphase, Telophase) and 5-class (G1, S and G2
    merged into Interphase): kNN (k = 11, Euclidean, docs/METHOD.md vote rule) and MLP (stratified
    5-fold). Silhouette (cosine) of the 7 classes and one UMAP per method.
``bbbc021-chx``
    MCF-7 cells of BBBC021 (Caie et al. 2010), up to ``per_well`` cells per well: kNN DMSO vs
    cycloheximide and kNN of the dose (0, 5, 15, 50 uM); cells averaged per site, then copairs
    mAP of each dose against the DMSO sites of the same plate, and of each dose's wells against the
    DMSO wells (one per plate, so of every plate).
``bbbc021-cp-profiles``
    The profile back end alone, on the CellProfiler per-well means of Ljosa et al. 2013: sphering
    fitted on the DMSO wells (pipeline default regulariser, each scope reported), treatment means,
    NSC/NSCB on the 103 treatments. Image methods do not apply (no images).
``lincs-plate``
    One LINCS Cell Painting plate (normalised, feature-selected CellProfiler profiles): copairs
    activity mAP of each compound (its doses as replicates) against same-plate DMSO, and MoA
    consistency across compounds. Image methods do not apply.

A suite whose data is missing returns ``status: "skipped"`` with the reason; nothing is faked.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ..io.arrays import load_array
from ..io.tables import sample_per_group
from ..profiles.aggregate import aggregate, feature_columns, treatment_profiles
from ..profiles.sphering import DEFAULT_REGULARIZATION, sphere_profiles
from .baselines import METHODS, extract
from ..plots import embedding_png
from .mapping import activity_map, consistency_map
from .metrics import knn_accuracy, mlp_accuracy, silhouette
from .nsc import nsc_nscb, treatment_batches
from ..profiles.controls import negative_controls

PROFILE_METHOD = "cellprofiler_profiles"
INTERPHASE = ("G1", "S", "S_phase", "G2")  # merged into one class in the 5-class task (the data says S_phase)
NOT_APPLICABLE = "n/a: this suite has profiles, no images"


class MissingData(Exception):
    """The files a suite needs are not there."""


def machine() -> dict:
    """The hardware the numbers were measured on."""
    import psutil
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(psutil.virtual_memory().total / 2 ** 30, 1), "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _need(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise MissingData(f"missing {', '.join(missing)}")


def _row(task: str, metric: str, method: str, value, **extra) -> dict:
    return {"task": task, "metric": metric, "method": method,
            "value": None if value is None else float(value), **extra}


def _run_methods(images: np.ndarray, channel_names: Sequence[str], methods: Sequence[str], weights,
                 mask_channels, log: Callable[[str], None]) -> dict:
    out = {}
    for m in methods:
        log(f"  {m}: {len(images)} cells x {images.shape[1]} channels ...")
        out[m] = extract(m, images, channel_names, weights=weights, mask_channels=mask_channels,
                         compile=m in ("microsnoop", "random_init") and len(images) * images.shape[1] >= 512)
        log(f"  {m}: {out[m]['seconds']:.1f} s ({1000 * out[m]['seconds_per_cell']:.1f} ms per cell)")
    return out


def five_class(phases: np.ndarray) -> np.ndarray:
    """7 cell-cycle phases -> 5 classes: G1, S and G2 become ``Interphase``; the mitotic phases stay."""
    phases = np.asarray(phases).astype(str)
    return np.where(np.isin(phases, INTERPHASE), "Interphase", phases)


def suite_mlcp(data: Path, out: Path, methods: Sequence[str], weights=None, per_class: int = 100, seed: int = 0,
               log=print) -> dict:
    d = data / "mlcp_cellcycle"
    _need(d / "cells.npz", d / "cells.csv")
    meta = pd.read_csv(d / "cells.csv")
    exp1 = np.flatnonzero(meta["Metadata_Experiment"].eq("Experiment_1").to_numpy())
    pick = exp1[sample_per_group(meta.iloc[exp1], ["Metadata_Phase"], per_class, seed)]
    images = load_array(d / "cells.npz")[pick]
    y7 = meta["Metadata_Phase"].to_numpy()[pick].astype(str)
    y5 = five_class(y7)
    feats = _run_methods(images, ["Brightfield", "DNA", "Darkfield"], methods, weights, [1], log)
    rows, figures = [], []
    for m, r in feats.items():
        for task, y in (("7-class", y7), ("5-class", y5)):
            k = knn_accuracy(r["features"], y, k=11)
            rows.append(_row(task, "kNN k=11 accuracy", m, k["accuracy"], macro_f1=k["macro_f1"],
                             per_class=k["per_class"]))
            p = mlp_accuracy(r["features"], y, folds=5, seed=seed)
            rows.append(_row(task, "MLP 5-fold accuracy", m, p["accuracy"], sd=p["sd"], macro_f1=p["macro_f1"],
                             per_class=p["per_class"]))
        rows.append(_row("7-class", "silhouette (cosine)", m, silhouette(r["features"], y7)))
        figures.append(str(embedding_png(r["features"], y7, out / f"umap_{m}.png", f"mlcp 7-class, {m}", seed=seed)
                           .name))
    counts = pd.Series(y7).value_counts().to_dict()
    return {"data": {"cells": int(len(pick)), "per_class_cap": per_class, "classes": counts,
                     "classes_5": pd.Series(y5).value_counts().to_dict(),
                     "source": "Blasi et al. 2016 (BBBC048 family), Experiment_1"},
            "methods": feats, "metrics": rows, "figures": figures}


def suite_chx(data: Path, out: Path, methods: Sequence[str], weights=None, per_well: int = 40, seed: int = 0,
              log=print, null_size: int = 10000) -> dict:
    d = data / "bbbc021_chx"
    _need(d / "cells.npz", d / "cells.csv")
    meta = pd.read_csv(d / "cells.csv")
    pick = sample_per_group(meta, ["Metadata_Plate", "Metadata_Well"], per_well, seed)
    images = load_array(d / "cells.npz")[pick]
    meta = meta.iloc[pick].reset_index(drop=True)
    drug = meta["Metadata_Compound"].astype(str).to_numpy()
    dose = meta["Metadata_Concentration"].map(lambda c: f"{c:g} uM").to_numpy()
    feats = _run_methods(images, ["DAPI", "ch1", "ch2"], methods, weights, None, log)
    rows, figures = [], []
    keys = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Compound", "Metadata_Concentration",
            "Metadata_pert_type"]
    for m, r in feats.items():
        k = knn_accuracy(r["features"], drug, k=11)
        rows.append(_row("DMSO vs cycloheximide (cells)", "kNN k=11 accuracy", m, k["accuracy"],
                         macro_f1=k["macro_f1"], per_class=k["per_class"]))
        k = knn_accuracy(r["features"], dose, k=11)
        rows.append(_row("dose (cells)", "kNN k=11 accuracy", m, k["accuracy"], macro_f1=k["macro_f1"],
                         per_class=k["per_class"]))
        cells = pd.concat([meta[keys], pd.DataFrame(r["features"], columns=[f"f{i}" for i in
                                                                            range(r["features"].shape[1])])], axis=1)
        sites = aggregate(cells, keys, "mean")
        a = activity_map(sites, ["Metadata_Compound", "Metadata_Concentration"], null_size=null_size, seed=seed)
        rows.append(_row("dose vs same-plate DMSO (sites)", "mAP", m, a["mean_map"],
                         fraction_retrieved=a["fraction_retrieved"], groups=a["n_groups"]))
        # wells: one DMSO well per plate, so the negatives are the DMSO wells of every plate
        wells = aggregate(sites.drop(columns="Metadata_Site"), [k for k in keys if k != "Metadata_Site"], "mean")
        a = activity_map(wells, ["Metadata_Compound", "Metadata_Concentration"], same_plate=False,
                         null_size=null_size, seed=seed)
        rows.append(_row("dose vs DMSO (wells)", "mAP", m, a["mean_map"],
                         fraction_retrieved=a["fraction_retrieved"], groups=a["n_groups"]))
        figures.append(str(embedding_png(r["features"], dose, out / f"umap_{m}.png", f"BBBC021 CHX dose, {m}",
                                         seed=seed).name))
    return {"data": {"cells": int(len(pick)), "per_well_cap": per_well, "wells": int(meta.groupby(
        ["Metadata_Plate", "Metadata_Well"]).ngroups), "source": "BBBC021 (Caie et al. 2010), Week4"},
            "methods": feats, "metrics": rows, "figures": figures}


def load_bbbc021_well_profiles(data: Path) -> pd.DataFrame:
    """Ljosa et al. 2013 per-well CellProfiler means joined to compound, concentration and MoA.

    Returns one row per well: ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Batch`` (the week),
    ``Metadata_Compound``, ``Metadata_Concentration``, ``Metadata_moa``, ``Metadata_pert_type``
    (negcon for DMSO) and the features that are finite and not constant.
    """
    d = data / "bbbc021_profiles"
    files = [d / "ljosa_jbiomolscreen_2013_per_well_mean.csv.gz", d / "BBBC021_v1_image.csv.gz",
             d / "BBBC021_v1_moa.csv"]
    _need(*files)
    wells = pd.read_csv(files[0]).rename(columns={"Image_Metadata_Plate": "Metadata_Plate",
                                                  "Image_Metadata_Well": "Metadata_Well"})
    img = pd.read_csv(files[1], usecols=["Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI",
                                         "Image_Metadata_Compound", "Image_Metadata_Concentration"])
    img.columns = ["Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Concentration"]
    moa = pd.read_csv(files[2]).rename(columns={"compound": "Metadata_Compound", "concentration":
                                                "Metadata_Concentration", "moa": "Metadata_moa"})
    meta = (wells[["Metadata_Plate", "Metadata_Well"]]
            .merge(img.drop_duplicates(["Metadata_Plate", "Metadata_Well"]), on=["Metadata_Plate", "Metadata_Well"],
                   how="left")
            .merge(moa, on=["Metadata_Compound", "Metadata_Concentration"], how="left"))
    if meta["Metadata_Compound"].isna().any():
        bad = meta[meta["Metadata_Compound"].isna()][["Metadata_Plate", "Metadata_Well"]].head(3)
        raise ValueError(f"{files[0].name}: wells not in {files[1].name}: {bad.to_dict('records')}")
    meta["Metadata_Batch"] = meta["Metadata_Plate"].str.split("_").str[0]
    meta["Metadata_pert_type"] = np.where(meta["Metadata_Compound"].eq("DMSO"), "negcon", "trt")
    X = wells[[c for c in wells.columns if c not in ("Metadata_Plate", "Metadata_Well")]]
    X = X.loc[:, X.notna().all() & (X.std() > 0)]
    return pd.concat([meta, X.astype(np.float64)], axis=1)


# Sphering variants compared by the profile suites: pycytominer's fixed epsilon, Ledoit-Wolf and the default.
SPHERING_VARIANTS = {"epsilon 1e-6": {"regularization": "epsilon", "epsilon": 1e-6},
                     "Ledoit-Wolf shrinkage": {"regularization": "shrinkage"},
                     DEFAULT_REGULARIZATION: {"regularization": DEFAULT_REGULARIZATION}}
SPHERING_NOTE = ("ZCA-cor fitted on the negative-control wells; 'epsilon 1e-6' is pycytominer's default, "
                 f"'{DEFAULT_REGULARIZATION}' (epsilon = the controls' mean eigenvalue) this package's; Ledoit-Wolf "
                 "shrinkage is the other option")


def _fit_digest(fits: list[dict]) -> list[dict]:
    """The diagnostics of each sphering fit, for the suite's JSON."""
    keep = ("group", "n_controls", "n_features", "rank", "effective_rank", "condition_number_before",
            "condition_number_after", "epsilon", "shrinkage")
    return [{k: f.get(k) for k in keep} for f in fits]


def suite_cp_profiles(data: Path, out: Path, methods: Sequence[str], seed: int = 0, log=print, **_) -> dict:
    wells = load_bbbc021_well_profiles(data)
    keys = ["Metadata_Compound", "Metadata_Concentration"]
    batches = {rule: treatment_batches(wells[~negative_controls(wells)], keys, rule)
               for rule in ("batch", "plate")}
    rows, detail, figures, variants = [], {}, [], {}
    for scope, reg in [("none", None)] + [(s, r) for s in ("global", "batch", "plate") for r in SPHERING_VARIANTS]:
        if scope == "none":
            sphered, fits = wells, []
        else:
            sphered, fits = sphere_profiles(wells, scope=scope, **SPHERING_VARIANTS[reg])
        treat = treatment_profiles(sphered, keys, "mean")
        variant = f"{PROFILE_METHOD}, " + ("not sphered" if scope == "none" else f"sphered ({scope} scope, {reg})")
        variants[variant] = {"seconds_per_cell": None, "dim": len(feature_columns(wells)), "sphering_fits": len(fits),
                             "sphering": _fit_digest(fits)}
        for rule, b in batches.items():
            res = nsc_nscb(treat.merge(b, on=keys), metric="cosine")
            if rule == "batch":
                rows.append(_row("NSC", "1-NN cosine", variant, res["nsc"]["accuracy"],
                                 correct=res["nsc"]["correct"], total=res["nsc"]["total"]))
            rows.append(_row("NSCB, week batches" if rule == "batch" else "NSCB, plate-string batches",
                             "1-NN cosine", variant, res["nscb"]["accuracy"], correct=res["nscb"]["correct"],
                             total=res["nscb"]["total"]))
            detail[f"{scope}/{reg}/{rule}"] = {"nsc_failed": res["nsc"]["failed"], "nscb_failed": res["nscb"]["failed"],
                                               "nscb_dropped_moas": res["nscb"]["dropped_moas"]}
        if scope == "global" and reg == DEFAULT_REGULARIZATION:
            figures.append(str(embedding_png(treat[feature_columns(treat)].to_numpy(), treat["Metadata_moa"],
                                             out / "umap_treatments_global.png",
                                             "BBBC021 treatments (CellProfiler, sphered globally)", seed=seed).name))
    return {"data": {"wells": int(len(wells)), "features": len(feature_columns(wells)),
                     "treatments": int(wells.loc[~negative_controls(wells), keys].drop_duplicates()
                                       .shape[0]), "dmso_wells": int(negative_controls(wells).sum()),
                     "source": "Ljosa et al. 2013 per-well means of BBBC021"},
            "methods": {**variants, **{m: {"not_applicable": NOT_APPLICABLE} for m in methods}},
            "sphering": SPHERING_NOTE, "metrics": rows, "failed": detail, "figures": figures}


def suite_lincs(data: Path, out: Path, methods: Sequence[str], seed: int = 0, log=print,
                null_size: int = 10000, **_) -> dict:
    f = data / "lincs_plate" / "SQ00015054_normalized_feature_select.csv.gz"
    _need(f)
    df = pd.read_csv(f)
    ctrl = df["Metadata_pert_type"].eq("control").to_numpy()
    rows, variants = [], {}
    # one plate: the plate, batch and global scopes are the same fit
    for reg in [None, *SPHERING_VARIANTS]:
        if reg is None:
            prof, fits, variant = df, [], PROFILE_METHOD
        else:
            prof, fits = sphere_profiles(df, controls=ctrl, scope="global", **SPHERING_VARIANTS[reg])
            variant = f"{PROFILE_METHOD}, sphered on the plate's DMSO wells ({reg})"
        a = activity_map(prof, "Metadata_broad_sample", controls=ctrl, null_size=null_size, seed=seed)
        c = consistency_map(prof, "Metadata_moa", controls=ctrl, null_size=null_size, seed=seed,
                            pos_diffby=["Metadata_broad_sample"])
        rows += [_row("compound (doses as replicates) vs same-plate DMSO", "mAP", variant, a["mean_map"],
                      fraction_retrieved=a["fraction_retrieved"], groups=a["n_groups"]),
                 _row("MoA consistency across compounds", "mAP", variant, c["mean_map"],
                      fraction_retrieved=c["fraction_retrieved"], groups=c["n_groups"])]
        variants[variant] = {"seconds_per_cell": None, "dim": len(feature_columns(df)), "sphering": _fit_digest(fits)}
    trt = df[~ctrl]
    fig = embedding_png(df[feature_columns(df)].to_numpy(), np.where(ctrl, "DMSO", "treated"),
                        out / "umap_wells.png", "LINCS SQ00015054 wells", seed=seed)
    return {"data": {"wells": int(len(df)), "dmso_wells": int(ctrl.sum()), "compounds":
                     int(trt["Metadata_broad_sample"].nunique()), "source": "LINCS Cell Painting, plate SQ00015054"},
            "methods": {**variants, **{m: {"not_applicable": NOT_APPLICABLE} for m in methods}},
            "sphering": SPHERING_NOTE + "; one plate, so plate, batch and global scopes are one fit",
            "metrics": rows, "figures": [fig.name]}


SUITES: dict[str, Callable] = {"mlcp-cellcycle": suite_mlcp, "bbbc021-chx": suite_chx,
                               "bbbc021-cp-profiles": suite_cp_profiles, "lincs-plate": suite_lincs}


def run_suite(name: str, data: str | Path, out: str | Path, methods: Sequence[str] = METHODS, weights=None,
              log: Callable[[str], None] = print, **options) -> dict:
    """Run one suite and write ``<out>/<name>/result.json``, ``table.md`` and its PNGs.

    Parameters
    ----------
    name : one of :data:`SUITES`
    data : the ``shared/data`` folder
    methods : subset of :data:`~microsnoop_ray.evaluate.baselines.METHODS`
    weights : checkpoint for ``microsnoop`` (default: the shipped weights)
    options : ``per_class``, ``per_well``, ``seed``, ``null_size`` (as the suite takes them)

    Returns
    -------
    dict: the result document (``status`` ok or skipped).
    """
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose from {sorted(SUITES)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now(_dt.timezone.utc)
    doc = {"suite": name, "started": started.isoformat(timespec="seconds"), "machine": machine(),
           "options": dict(options), "methods_asked": list(methods)}
    if "microsnoop" in methods:
        from ..model import load_model

        card = load_model(weights).model_card
        doc["model_card"] = card.to_dict() if card else {"path": str(weights)}
        doc["model_card"].pop("extra", None)
    try:
        log(f"{name}:")
        res = SUITES[name](Path(data), folder, methods, weights=weights, log=log, **options)
        doc.update(status="ok", **res)
    except MissingData as exc:
        doc.update(status="skipped", reason=f"data missing: {exc}")
        log(f"{name}: skipped ({doc['reason']})")
    doc["seconds"] = round((_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(), 1)
    for m in doc.get("methods", {}).values():
        m.pop("features", None)
    (folder / "result.json").write_text(json.dumps(doc, indent=1, default=_json_default))
    (folder / "table.md").write_text(table_markdown(doc))
    return doc


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _fmt(r: dict) -> str:
    if r["value"] is None:
        return "-"
    s = f"{r['value']:.3f}"
    if r.get("sd") is not None:
        s += f" ± {r['sd']:.3f}"
    if r.get("correct") is not None:
        s += f" ({r['correct']}/{r['total']})"
    if r.get("fraction_retrieved") is not None:
        s += f" (retrieved {r['fraction_retrieved']:.2f})"
    return s


def table_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """The cells of a suite's table: a header and one row per method (a column per task and metric,
    and the time per cell). Rendered by :func:`table_markdown` and the HTML report."""
    cols: list[tuple[str, str]] = []
    for r in doc["metrics"]:
        if (r["task"], r["metric"]) not in cols:
            cols.append((r["task"], r["metric"]))
    cell = {(r["method"], r["task"], r["metric"]): _fmt(r) for r in doc["metrics"]}
    header = ["method"] + [f"{t}: {m}" for t, m in cols] + ["s per cell"]
    rows = []
    for name, info in doc["methods"].items():
        if info.get("not_applicable"):
            rows.append([name] + ["n/a"] * len(cols) + [info["not_applicable"]])
            continue
        spc = info.get("seconds_per_cell")
        rows.append([name] + [cell.get((name, t, m), "-") for t, m in cols] + ["-" if spc is None else f"{spc:.4f}"])
    return header, rows


def status_line(doc: dict) -> str:
    """What a suite that did not run says instead of a table."""
    return f"**{doc['suite']}**: {doc.get('status')} ({doc.get('reason', '')})"


def table_markdown(doc: dict) -> str:
    """One Markdown table of a suite result (:func:`table_rows`), or its status line."""
    if doc.get("status") != "ok":
        return status_line(doc) + "\n"
    header, rows = table_rows(doc)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
