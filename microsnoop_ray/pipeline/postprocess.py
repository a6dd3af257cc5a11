"""Post-processing of a profiling run: a pure function of the written site files.

Site -> well aggregation, plate map, constant features, sphering on the negative controls,
treatment profiles. It is redone on every run, so its output is the same whether the run was
interrupted or not.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ..errors import CELL_LEFT_OUT, PLATE_MAP, SITE_NOT_PROFILED, InputError
from ..io.sources import PlateInfo
from ..io.tables import join_platemap
from ..io.write import write_parquet
from ..profiles.aggregate import SITE_KEYS, WELL_KEYS, aggregate, feature_columns, treatment_profiles
from ..profiles.controls import negative_controls
from ..profiles.sphering import sphere_profiles
from .config import ProfileConfig
from .layout import TREATMENT, WELL, WELL_SPHERED, Layout, skipped_row, write_skipped

log = logging.getLogger(__name__)


def read_sites(layout: Layout, plates: dict[str, PlateInfo], method: str = "mean",
               ) -> tuple[pd.DataFrame, list[dict], int]:
    """Site profiles from the written site files (one file in memory at a time), what is missing, and
    how many per-cell values are NaN (CellProfiler measurements cp-measure could not define; the
    aggregation skips them)."""
    rows, skipped, nan_values = [], [], 0
    for plate, info in sorted(plates.items()):
        for key in sorted(set(info.sites), key=lambda k: (str(k.well), k.site)):
            written, reason, dropped = layout.read_notes(info.batch, key)
            if written:
                cells = pd.read_parquet(layout.site_dir(info.batch, key) / "embeddings.parquet")
                keys = SITE_KEYS + ["Metadata_Row", "Metadata_Column"]
                feats = feature_columns(cells)
                nan_values += int(cells[feats].isna().to_numpy().sum())
                rows.append(aggregate(cells[keys + feats], keys, method))
                skipped += [skipped_row(key, CELL_LEFT_OUT, c["reason"]) for c in dropped]
            else:
                skipped.append(skipped_row(key, SITE_NOT_PROFILED,
                                           reason or "not processed (interrupted run? rerun the same command)"))
    sites = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    return sites, skipped, nan_values


def postprocess(cfg: ProfileConfig, plates: dict[str, PlateInfo], layout: Layout, problems: list[dict],
                provenance: dict, platemap: pd.DataFrame | None = None) -> dict:
    """Site -> well aggregation, plate map, sphering, treatments; writes every profile file."""
    sites, skipped, nan_values = read_sites(layout, plates, cfg.aggregation)
    skipped = [skipped_row((p["Metadata_Plate"], p["Metadata_Well"], p["Metadata_Site"]), p["kind"], p["reason"])
               for p in problems] + skipped
    summary = {"model_id": layout.model_id, "out": str(layout.root), "plates": {}, "outputs": [],
               "aggregation": cfg.aggregation, "sphering": None,
               "provenance": {k: v for k, v in provenance.items() if k != "model_card"}}
    if sites.empty:
        write_skipped(skipped, layout.root / "skipped.csv")
        summary["plates"] = {p: {"wells": 0, "sites": 0, "cells": 0, "sites_skipped": len(i.sites)}
                             for p, i in plates.items()}
        summary["skipped"] = len(skipped)
        return summary
    wells = aggregate(sites.drop(columns=["Metadata_Site"]), WELL_KEYS + ["Metadata_Row", "Metadata_Column"],
                      cfg.aggregation)
    n_sites = sites.groupby(["Metadata_Plate", "Metadata_Well"]).size().rename("Metadata_Site_Count").reset_index()
    wells = wells.merge(n_sites, on=["Metadata_Plate", "Metadata_Well"], how="left")
    wells, map_problems = join_platemap(wells, platemap)
    wells = wells.drop(columns=["Metadata_Model"], errors="ignore")
    wells.insert(3, "Metadata_Model", layout.model_id)
    skipped += [skipped_row((p["Metadata_Plate"], p["Metadata_Well"], None), PLATE_MAP, p["reason"])
                for p in map_problems]
    wells, summary["nonfinite"] = drop_undefined(wells, nan_values)
    constant = constant_features(sites[[c for c in sites.columns if c in wells.columns]], plates)
    summary["constant_features"] = constant
    for plate, c in constant.items():
        log.warning("plate %s: %d feature(s) are constant over its sites%s%s", plate, c["n_features"],
                    f" (channels {', '.join(c['channels'])} are empty)" if c["channels"] else "",
                    "; dropped (--drop-constant)" if cfg.drop_constant else
                    "; pass --drop-constant to remove them before pycytominer")
    if cfg.drop_constant and constant:
        drop = sorted(set().union(*(c["features"] for c in constant.values())))
        wells = wells.drop(columns=drop)
        summary["dropped_constant_features"] = len(drop)
    feats = feature_columns(wells)
    wells = wells[[c for c in wells.columns if c not in feats] + feats]
    prov = {**provenance, "aggregation": f"cell->site {cfg.aggregation}, site->well {cfg.aggregation}"}
    for plate, sub in wells.groupby("Metadata_Plate", sort=True):
        info = plates[plate]
        path = write_parquet(sub.reset_index(drop=True), layout.plate_dir(info.batch, plate) / f"{plate}.parquet",
                             {**prov, "channels": info.channels, "level": WELL})
        summary["outputs"].append({"level": WELL, "plate": plate, "path": str(path.relative_to(layout.root)),
                                   "rows": len(sub)})
    final = wells
    sph = cfg.sphering
    n_controls = int(negative_controls(wells).sum())
    if sph.scope != "none" and n_controls == 0 and not sph.required:
        why = ("no plate map" if platemap is None else "no Metadata_pert_type column in the plate map"
               if "Metadata_pert_type" not in wells else "no negcon wells")
        log.warning("sphering not applied: %s (set sphering.required to make this an error)", why)
        summary["sphering"] = {"applied": False, "reason": why}
    elif sph.scope != "none":
        final, fits = _sphere(cfg, wells, layout, plates)
        summary["sphering"] = {"applied": True, "scope_requested": sph.scope, "fit_on": sph.fit_on, "fits": fits}
        for plate, sub in final.groupby("Metadata_Plate", sort=True):
            info = plates[plate]
            path = write_parquet(sub.reset_index(drop=True),
                                 layout.plate_dir(info.batch, plate) / f"{plate}_sphered.parquet",
                                 {**prov, "channels": info.channels, "level": WELL, "sphering":
                                  [f for f in summary["sphering"]["fits"] if f["group"] in (None, plate, info.batch)]})
            summary["outputs"].append({"level": WELL_SPHERED, "plate": plate,
                                       "path": str(path.relative_to(layout.root)), "rows": len(sub)})
    keys = [k for k in cfg.treatment_keys if k in final.columns]
    if keys and len(keys) == len(cfg.treatment_keys):
        treat = treatment_profiles(final, keys, cfg.aggregation)
        treat = treat.drop(columns=["Metadata_Model"], errors="ignore")
        treat.insert(len(keys), "Metadata_Model", layout.model_id)
        path = write_parquet(treat, layout.treatments(), {**prov, "level": TREATMENT, "keys": keys,
                                                          "sphering": summary["sphering"]})
        summary["outputs"].append({"level": TREATMENT, "plate": "all", "path": str(path.relative_to(layout.root)),
                                   "rows": len(treat)})
    write_skipped(skipped, layout.root / "skipped.csv")
    for plate, info in sorted(plates.items()):
        s = sites[sites["Metadata_Plate"] == plate]
        summary["plates"][plate] = {
            "batch": info.batch, "wells": int(s["Metadata_Well"].nunique()), "sites": int(len(s)),
            "cells": int(s["Metadata_Object_Count"].sum()),
            "sites_skipped": int(sum(1 for k in skipped if k["Metadata_Plate"] == plate
                                     and k["kind"] == SITE_NOT_PROFILED))}
    summary["skipped"] = sum(1 for k in skipped if k["kind"] != PLATE_MAP)
    summary["plate_map_problems"] = sum(1 for k in skipped if k["kind"] == PLATE_MAP)
    return summary


def _sphere(cfg: ProfileConfig, wells: pd.DataFrame, layout: Layout, plates: dict) -> tuple[pd.DataFrame, list]:
    sph = cfg.sphering
    if "Metadata_pert_type" not in wells:
        raise InputError(cfg.platemap or "plate map", "sphering needs Metadata_pert_type (negcon controls) in the "
                                                       "plate map; set sphering.scope: none to skip it")
    fit_on = None
    if sph.fit_on in ("cells", "sites"):
        parts = []
        for r in wells[negative_controls(wells)].itertuples(index=False):
            info = plates[r.Metadata_Plate]
            for key in info.sites:
                f = layout.site_dir(info.batch, key) / "embeddings.parquet"
                if key.well == r.Metadata_Well and f.exists():
                    cells = pd.read_parquet(f)
                    if sph.fit_on == "sites":
                        cells = aggregate(cells[SITE_KEYS + feature_columns(cells)], SITE_KEYS, cfg.aggregation)
                    parts.append(cells)
        fit_on = pd.concat(parts, ignore_index=True) if parts else wells.iloc[:0]
    kw = dict(method=sph.method, regularization=sph.regularization,
              epsilon=None if sph.epsilon is None else float(sph.epsilon), fit_on=fit_on)
    try:
        return sphere_profiles(wells, scope=sph.scope, **kw)
    except ValueError as exc:
        if not sph.fallback:
            raise InputError("sphering", f"{exc}") from None
        log.warning("sphering with scope %s failed (%s); falling back to scope %s", sph.scope, exc, sph.fallback)
        try:
            out, fits = sphere_profiles(wells, scope=sph.fallback, **kw)
        except ValueError as exc2:
            raise InputError("sphering", f"scope {sph.scope}: {exc}; fallback scope {sph.fallback}: {exc2} "
                                         "(add negcon wells to the plate map, or set sphering.scope: none)") from None
        for f in fits:
            f["fallback_from"] = sph.scope
        return out, fits


def constant_features(sites: pd.DataFrame, plates: dict[str, PlateInfo]) -> dict:
    """Per plate: the features constant over its site profiles, and the channels all of whose features are.

    Returns ``{plate: {"n_features", "features", "channels"}}`` for the plates that have any (an empty
    channel gives 256 constant features; pycytominer's spherize divides by their zero variance).
    """
    out = {}
    feats = feature_columns(sites)
    for plate, sub in sites.groupby("Metadata_Plate", sort=True):
        if len(sub) < 2:
            continue
        const = [f for f, sd in zip(feats, sub[feats].to_numpy(np.float64).std(axis=0)) if sd == 0]
        if not const:
            continue
        chans = [ch for ch in plates[plate].channels
                 if all(f in set(const) for f in feats if f.startswith(f"Microsnoop_{ch}_"))
                 and any(f.startswith(f"Microsnoop_{ch}_") for f in feats)]
        out[plate] = {"n_features": len(const), "features": const, "channels": chans}
    return out


def drop_undefined(wells: pd.DataFrame, nan_values: int) -> tuple[pd.DataFrame, dict]:
    """The NaN rule's last step: a feature still NaN in some well profile (no cell of that well had a
    value) is left out of the profiles, so that sphering and treatments see finite numbers only.

    Returns the wells without those features and the counts for ``summary.json``.
    """
    feats = feature_columns(wells)
    undefined = [f for f, bad in zip(feats, wells[feats].isna().any().to_numpy()) if bad]
    if undefined:
        log.warning("%d feature(s) are undefined (NaN) in some well, left out of the profiles: %s%s",
                    len(undefined), ", ".join(undefined[:5]), " ..." if len(undefined) > 5 else "")
    return wells.drop(columns=undefined), {"rule": "per cell: undefined or infinite measurements are NaN; "
                                                   "aggregation skips NaN; features NaN in any well are left out",
                                           "nan_cell_values": nan_values,
                                           "features_left_out": undefined}
