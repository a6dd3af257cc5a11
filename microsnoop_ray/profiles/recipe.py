"""The JUMP profiling recipe after aggregation: normalise to the negative controls, select features,
sphere on the controls, in the order a recipe names.

Each step is a call into pycytominer where pycytominer does the job (``normalize``,
``feature_select``); sphering is :func:`~microsnoop_ray.profiles.sphering.sphere_profiles`, which
holds with fewer controls than features where pycytominer's fixed epsilon does not. The functions
are pure: profiles in, profiles and a note of what was done out, so the same recipe serves the
written well profiles and the run's own evaluation (:mod:`~microsnoop_ray.evaluate.mapping`).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd

from .aggregate import feature_columns
from .controls import NEGCON_VALUES, negative_controls

log = logging.getLogger(__name__)

#: the steps a recipe may name, in JUMP's order
RECIPE_STEPS = ("normalize", "feature_select", "sphere")
DEFAULT_RECIPE = "normalize,feature_select,sphere"
#: pycytominer's normalisations offered: JUMP's robust one (median and MAD of the controls) and z-scores
NORMALIZE_METHODS = ("mad_robustize", "standardize")
#: pycytominer's feature-selection operations of the JUMP recipe
FEATURE_SELECT_OPERATIONS = ("variance_threshold", "correlation_threshold", "blocklist")
#: Correlations between features estimated from fewer profiles than this are too noisy to drop
#: features by (four wells correlate almost every pair above 0.9): the operation is then skipped
#: and the note says why. A 384-well plate has far more.
MIN_PROFILES_FOR_CORRELATION = 50


def parse_recipe(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"normalize,feature_select,sphere"`` -> its steps, checked (``""`` or ``"none"``: no step).

    Raises
    ------
    ValueError
        An unknown or repeated step.
    """
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    names = [] if names == ["none"] else names
    bad = [n for n in names if n not in RECIPE_STEPS]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"recipe must be a comma list of distinct steps from {', '.join(RECIPE_STEPS)} "
                         f"(or none), not {text!r}")
    return tuple(names)


def normalize(profiles: pd.DataFrame, method: str = "mad_robustize", features: Sequence[str] | None = None,
              ) -> tuple[pd.DataFrame, dict]:
    """pycytominer's ``normalize`` per plate, fitted on the plate's negative controls.

    Parameters
    ----------
    profiles : DataFrame
        ``Metadata_*`` columns (``Metadata_Plate``, ``Metadata_pert_type``) and features.
    method : {"mad_robustize", "standardize"}
    features : list of str, optional
        Default: every non-metadata column.

    Returns
    -------
    normalized : DataFrame, the same rows, features that came out non-finite (no spread among
        the controls) left out
    note : dict, what was done (plates fitted on their controls or on all profiles)
    """
    from pycytominer import normalize as pcm_normalize

    if method not in NORMALIZE_METHODS:
        raise ValueError(f"normalize method must be one of {NORMALIZE_METHODS}, not {method!r}")
    feats = list(features) if features is not None else feature_columns(profiles)
    meta = [c for c in profiles.columns if c not in feats]
    parts, fitted_on = [], {}
    for plate, sub in profiles.groupby("Metadata_Plate", sort=True):
        controls = int(negative_controls(sub).sum())
        samples = f"Metadata_pert_type in {list(NEGCON_VALUES)}" if controls >= 2 else "all"
        fitted_on[str(plate)] = f"{controls} negative controls" if controls >= 2 else \
            f"all {len(sub)} profiles (fewer than 2 negative controls)"
        out = pcm_normalize(sub.reset_index(drop=True), features=feats, meta_features=meta, samples=samples,
                            method=method)
        parts.append(out.set_axis(sub.index))
    result = pd.concat(parts).loc[profiles.index]
    bad = [f for f in feats if not np.isfinite(result[f].to_numpy(np.float64)).all()]
    return result.drop(columns=bad), {"step": "normalize", "method": method, "fitted_on": fitted_on,
                                      "features_left_out": len(bad)}


def select_features(profiles: pd.DataFrame, operations: Sequence[str] = FEATURE_SELECT_OPERATIONS,
                    features: Sequence[str] | None = None) -> tuple[pd.DataFrame, dict]:
    """pycytominer's ``feature_select`` with JUMP's operations, over all the profiles given.

    ``correlation_threshold`` is skipped below :data:`MIN_PROFILES_FOR_CORRELATION` profiles (said
    in the note); ``blocklist`` is pycytominer's list of CellProfiler features known to mislead, and
    leaves embedding features alone.

    Returns
    -------
    selected : DataFrame, the same rows with the kept features
    note : dict, the operations run and skipped, and how many features each kept
    """
    from pycytominer import feature_select

    feats = list(features) if features is not None else feature_columns(profiles)
    ops = [op for op in operations if op in FEATURE_SELECT_OPERATIONS]
    skipped = {}
    if "correlation_threshold" in ops and len(profiles) < MIN_PROFILES_FOR_CORRELATION:
        ops.remove("correlation_threshold")
        skipped["correlation_threshold"] = (f"{len(profiles)} profiles: fewer than {MIN_PROFILES_FOR_CORRELATION} "
                                            "to estimate feature correlations from")
    out = feature_select(profiles.reset_index(drop=True), features=feats, operation=ops) if ops else profiles
    out = out.set_axis(profiles.index)
    kept = [f for f in feats if f in out.columns]
    meta = [c for c in profiles.columns if c not in feats]
    return out[meta + kept], {"step": "feature_select", "operations": ops, "skipped": skipped,
                              "features_before": len(feats), "features_after": len(kept)}


def apply_recipe(profiles: pd.DataFrame, steps: Sequence[str], normalize_method: str = "mad_robustize",
                 sphere=None, features: Sequence[str] | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """Run the recipe's steps in order.

    Parameters
    ----------
    profiles : DataFrame
    steps : sequence of :data:`RECIPE_STEPS`
    normalize_method : {"mad_robustize", "standardize"}
    sphere : callable(DataFrame) -> (DataFrame, list of fits), optional
        The sphering step (the job's configured :func:`~.sphering.sphere_profiles`); required when
        ``steps`` names ``sphere``.
    features : list of str, optional
        The features the recipe works on (e.g. one feature set); other non-metadata columns are
        dropped. Default: all.

    Returns
    -------
    profiles : DataFrame after the last step
    notes : list of dict, one per step
    """
    meta = [c for c in profiles.columns if str(c).startswith("Metadata_")]
    if features is not None:
        profiles = profiles[meta + list(features)]
    notes = []
    for step in steps:
        if step == "normalize":
            profiles, note = normalize(profiles, normalize_method)
        elif step == "feature_select":
            profiles, note = select_features(profiles)
        elif step == "sphere":
            profiles, fits = sphere(profiles)
            note = {"step": "sphere", "fits": fits}
        else:
            raise ValueError(f"unknown recipe step {step!r}")
        notes.append(note)
    return profiles, notes


#: column prefixes of each feature set (CellProfiler's three Cell Painting compartments)
FEATURE_SET_PREFIXES = {"microsnoop": ("Microsnoop_",), "cellprofiler": ("Nuclei_", "Cells_", "Cytoplasm_")}


def feature_sets_of(features: Sequence[str]) -> dict[str, list[str]]:
    """The feature sets present among ``features``: ``microsnoop``, ``cellprofiler`` and, when both are,
    ``both`` (each evaluated on its own: the recipe selects and spheres each set apart)."""
    sets = {name: [f for f in features if str(f).startswith(prefixes)]
            for name, prefixes in FEATURE_SET_PREFIXES.items()}
    sets = {k: v for k, v in sets.items() if v}
    if len(sets) == 2:
        sets["both"] = list(features)
    return sets
