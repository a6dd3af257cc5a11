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
from ..profiles.recipe import apply_recipe, feature_sets_of, normalize, parse_recipe, select_features
from ..profiles.sphering import sphere_profiles
from .config import ProfileConfig
from .layout import (TREATMENT, WELL, WELL_NORMALIZED, WELL_SELECTED, WELL_SPHERED, Layout, skipped_row,
                     write_skipped)

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
    """Site -> well aggregation, plate map, the recipe (normalise, select, sphere), treatments and the
    run's own evaluation; writes every profile file and returns the summary."""
    sites, skipped, nan_values = read_sites(layout, plates, cfg.aggregation)
    skipped = [skipped_row((p["Metadata_Plate"], p["Metadata_Well"], p["Metadata_Site"]), p["kind"], p["reason"])
               for p in problems] + skipped
    summary = {"model_id": layout.model_id, "out": str(layout.root), "plates": {}, "outputs": [],
               "aggregation": cfg.aggregation, "sphering": None, "recipe": [],
               "provenance": {k: v for k, v in provenance.items() if k != "model_card"}}
    if sites.empty:
        write_skipped(skipped, layout.root / "skipped.csv")
        summary["plates"] = {p: {"wells": 0, "sites": 0, "cells": 0, "sites_skipped": len(i.sites)}
                             for p, i in plates.items()}
        summary["skipped"] = len(skipped)
        return summary
    wells, map_problems = well_profiles(cfg, sites, layout.model_id, platemap, summary, nan_values, plates)
    skipped += [skipped_row((p["Metadata_Plate"], p["Metadata_Well"], None), PLATE_MAP, p["reason"])
                for p in map_problems]
    prov = {**provenance, "aggregation": f"cell->site {cfg.aggregation}, site->well {cfg.aggregation}"}
    out = _Writer(layout, plates, prov, summary)
    out.wells(wells, WELL, "")
    final = _run_recipe(cfg, wells, layout, plates, platemap, out)
    _write_treatments(cfg, final, layout, prov, summary)
    if cfg.evaluate:
        summary["evaluation"] = evaluate_run(cfg, sites, wells, platemap, plates, layout)
    write_skipped(skipped, layout.root / "skipped.csv")
    summary["plates"] = plate_counts(sites, plates, skipped)
    summary["skipped"] = sum(1 for k in skipped if k["kind"] != PLATE_MAP)
    summary["plate_map_problems"] = sum(1 for k in skipped if k["kind"] == PLATE_MAP)
    return summary


def well_profiles(cfg: ProfileConfig, sites: pd.DataFrame, model_id: str, platemap: pd.DataFrame | None,
                  summary: dict, nan_values: int, plates: dict[str, PlateInfo]) -> tuple[pd.DataFrame, list[dict]]:
    """Site profiles -> well profiles with their site count and plate-map columns, features undefined
    in some well left out (and, ``drop_constant``, those constant over a plate); notes go to ``summary``."""
    wells = aggregate(sites.drop(columns=["Metadata_Site"]), WELL_KEYS + ["Metadata_Row", "Metadata_Column"],
                      cfg.aggregation)
    n_sites = sites.groupby(["Metadata_Plate", "Metadata_Well"]).size().rename("Metadata_Site_Count").reset_index()
    wells = wells.merge(n_sites, on=["Metadata_Plate", "Metadata_Well"], how="left")
    wells, map_problems = join_platemap(wells, platemap)
    wells = wells.drop(columns=["Metadata_Model"], errors="ignore")
    wells.insert(3, "Metadata_Model", model_id)
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
    return wells[[c for c in wells.columns if c not in feats] + feats], map_problems


class _Writer:
    """Writes one profile file per plate for a level of the recipe and lists it in ``summary``."""

    def __init__(self, layout: Layout, plates: dict, prov: dict, summary: dict):
        self.layout, self.plates, self.prov, self.summary = layout, plates, prov, summary

    def wells(self, profiles: pd.DataFrame, level: str, suffix: str, **extra) -> None:
        for plate, sub in profiles.groupby("Metadata_Plate", sort=True):
            info = self.plates[plate]
            notes = {k: (v(plate, info) if callable(v) else v) for k, v in extra.items()}
            path = write_parquet(sub.reset_index(drop=True),
                                 self.layout.plate_dir(info.batch, plate) / f"{plate}{suffix}.parquet",
                                 {**self.prov, "channels": info.channels, "level": WELL, **notes})
            self.summary["outputs"].append({"level": level, "plate": plate, "rows": len(sub),
                                            "path": str(path.relative_to(self.layout.root))})


def _run_recipe(cfg: ProfileConfig, wells: pd.DataFrame, layout: Layout, plates: dict,
                platemap: pd.DataFrame | None, out: _Writer) -> pd.DataFrame:
    """The recipe's steps in order on the well profiles, each step's profiles written
    (``<plate>_normalized``, ``_normalized_feature_select``, ``_sphered``); returns the last."""
    current, names = wells, []
    for step in parse_recipe(cfg.recipe):
        if step == "sphere":
            sphered = _sphere_step(cfg, current, layout, plates, platemap, out.summary)
            if sphered is not None:
                current = sphered
                fits = out.summary["sphering"]["fits"]
                out.wells(current, WELL_SPHERED, "_sphered", sphering=lambda plate, info: [
                    f for f in fits if f["group"] in (None, plate, info.batch)])
            continue
        if step == "normalize":
            current, note = normalize(current, cfg.normalize)
            names.append("normalized")
        else:
            current, note = select_features(current)
            names.append("feature_select")
        out.summary["recipe"].append(note)
        out.wells(current, WELL_NORMALIZED if step == "normalize" else WELL_SELECTED, "_" + "_".join(names),
                  recipe=list(out.summary["recipe"]))
    return current


def _sphere_step(cfg: ProfileConfig, profiles: pd.DataFrame, layout: Layout, plates: dict,
                 platemap: pd.DataFrame | None, summary: dict) -> pd.DataFrame | None:
    """The recipe's sphering (None: not applied, with the reason in ``summary``)."""
    sph = cfg.sphering
    if sph.scope == "none":
        return None
    if int(negative_controls(profiles).sum()) == 0 and not sph.required:
        why = ("no plate map" if platemap is None else "no Metadata_pert_type column in the plate map"
               if "Metadata_pert_type" not in profiles else "no negcon wells")
        log.warning("sphering not applied: %s (set sphering.required to make this an error)", why)
        summary["sphering"] = {"applied": False, "reason": why}
        return None
    sphered, fits = _sphere(cfg, profiles, layout, plates)
    summary["sphering"] = {"applied": True, "scope_requested": sph.scope, "fit_on": sph.fit_on, "fits": fits}
    summary["recipe"].append({"step": "sphere", "scope": sph.scope, "method": sph.method})
    return sphered


def _write_treatments(cfg: ProfileConfig, final: pd.DataFrame, layout: Layout, prov: dict, summary: dict) -> None:
    keys = [k for k in cfg.treatment_keys if k in final.columns]
    if not keys or len(keys) != len(cfg.treatment_keys):
        return
    treat = treatment_profiles(final, keys, cfg.aggregation)
    treat = treat.drop(columns=["Metadata_Model"], errors="ignore")
    treat.insert(len(keys), "Metadata_Model", layout.model_id)
    path = write_parquet(treat, layout.treatments(), {**prov, "level": TREATMENT, "keys": keys,
                                                      "sphering": summary["sphering"], "recipe": summary["recipe"]})
    summary["outputs"].append({"level": TREATMENT, "plate": "all", "path": str(path.relative_to(layout.root)),
                               "rows": len(treat)})


def plate_counts(sites: pd.DataFrame, plates: dict[str, PlateInfo], skipped: list[dict]) -> dict:
    """Per plate: wells, sites and cells profiled, sites skipped."""
    out = {}
    for plate, info in sorted(plates.items()):
        s = sites[sites["Metadata_Plate"] == plate]
        out[plate] = {"batch": info.batch, "wells": int(s["Metadata_Well"].nunique()), "sites": int(len(s)),
                      "cells": int(s["Metadata_Object_Count"].sum()),
                      "sites_skipped": int(sum(1 for k in skipped if k["Metadata_Plate"] == plate
                                               and k["kind"] == SITE_NOT_PROFILED))}
    return out


def evaluate_run(cfg: ProfileConfig, sites: pd.DataFrame, wells: pd.DataFrame, platemap: pd.DataFrame | None,
                 plates: dict, layout: Layout) -> dict:
    """copairs mAP of the run, per feature set, on the recipe's profiles: replicates of each treatment
    against the same plate's negative controls (activity) and against other treatments (consistency).

    Replicates are wells; where no treatment has two wells on a plate (a plate fragment), they are
    the treatments' sites, and the result says so.
    """
    keys = [k for k in cfg.treatment_keys if k in wells.columns]
    if platemap is None or "Metadata_pert_type" not in wells or not keys:
        return {"applied": False, "reason": "needs a plate map with Metadata_pert_type and the treatment columns "
                                            f"{list(cfg.treatment_keys)}"}
    trt = wells[~negative_controls(wells) & wells[keys].notna().all(axis=1)]
    level, profiles = "well", wells
    if trt.empty or trt.groupby(["Metadata_Plate"] + keys).size().max() < 2:
        level = "site"
        profiles, _ = join_platemap(sites, platemap)
        profiles = profiles[[c for c in profiles.columns if c in wells.columns or c == "Metadata_Site"]]
    trt = profiles[~negative_controls(profiles) & profiles[keys].notna().all(axis=1)]
    if trt.empty or trt.groupby(["Metadata_Plate"] + keys).size().max() < 2:
        return {"applied": False, "replicates": level, "reason": "no treatment has two replicates (wells or sites) "
                                                                 "on a plate"}
    if not negative_controls(profiles).any():
        return {"applied": False, "replicates": level, "reason": "no negative controls (Metadata_pert_type negcon)"}
    steps = [s for s in parse_recipe(cfg.recipe) if s != "sphere" or cfg.sphering.scope != "none"]
    sph = cfg.sphering

    def sphere(p):
        return sphere_profiles(p, scope=sph.scope, method=sph.method, regularization=sph.regularization,
                               epsilon=None if sph.epsilon is None else float(sph.epsilon))

    result = {"applied": True, "replicates": level, "treatment_keys": keys, "recipe": list(steps),
              "feature_sets": {}}
    for name, feats in feature_sets_of(feature_columns(profiles)).items():
        try:
            result["feature_sets"][name] = _map_of(profiles, feats, steps, cfg.normalize, sphere, keys)
        except ValueError as exc:  # e.g. no negative controls left, or too few profiles for sphering
            result["feature_sets"][name] = {"applied": False, "reason": str(exc)}
    return result


def _map_of(profiles: pd.DataFrame, feats: list[str], steps, normalize_method: str, sphere, keys) -> dict:
    """The recipe on one feature set, then copairs' activity and consistency mAP."""
    from ..evaluate.mapping import activity_map, consistency_map

    done, notes = apply_recipe(profiles, steps, normalize_method, sphere, features=feats)
    out = {"features": len(feature_columns(done)), "profiles": len(done),
           "activity": _brief(activity_map(done, pert=keys))}
    trt = done[~negative_controls(done)]
    if trt[keys].drop_duplicates().shape[0] >= 2:
        out["consistency"] = _brief(consistency_map(done, pert=keys))
    else:
        out["consistency"] = {"applied": False, "reason": "fewer than two treatments"}
    return out


def _brief(res: dict) -> dict:
    """The copairs result as summary.json keeps it: means and, per treatment, mAP, corrected p, retrieved."""
    keep = ("mean_map", "fraction_retrieved", "n_groups", "n_profiles", "null_size", "threshold")
    return {**{k: res[k] for k in keep}, "per_treatment": [
        {**{k: v for k, v in g.items() if k.startswith("Metadata_")}, "mAP": round(float(g["mean_average_precision"]), 4),
         "corrected_p": float(g["corrected_p_value"]), "retrieved": bool(g["below_corrected_p"])}
        for g in res["per_group"]]}


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
