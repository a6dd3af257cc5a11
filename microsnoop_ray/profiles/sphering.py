"""ZCA sphering fitted on negative controls (``METHOD.md`` section 5).

Fitted on control profiles ``X`` (n x d): centre on the control mean ``mu``,
per-feature variances ``V`` (ddof 1), and for ``zca-cor`` the eigendecomposition
of the correlation matrix ``R = G diag(T) G^T``; the transform is
``W = G diag(1/sqrt(T_reg)) G^T diag(1/sqrt(V))`` and ``Y = (X - mu) W^T``.
``zca`` uses the covariance matrix and no per-feature scaling.

Regularisation of the eigenvalues ``T``:

``"epsilon"`` (default, as pycytominer)
    ``T_reg = T + epsilon``; ``V`` unfloored.
``"faithful"`` (the published reference code)
    ``T_reg = max(T, T_knee / 10)`` with ``T_knee`` the eigenvalue at the knee
    of the sorted spectrum (Kneedle, convex and decreasing: the point farthest
    below the chord from the first to the last normalised eigenvalue), and
    ``V`` floored at ``1e-3``. When the spectrum has no knee (the reference
    crashes there) the floor falls back to ``median(T) / 10``; the fit records
    which floor was used. Note that the absolute variance floor of 1e-3
    dominates for Microsnoop embeddings, whose variances are ~1e-5..1e-4: this
    mode reproduces the reference, it does not whiten them.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

METHODS = ("zca-cor", "zca")
REGULARIZATIONS = ("epsilon", "faithful")


@dataclasses.dataclass
class Sphering:
    """A fitted transform: ``transform(X) = (X - mean) @ W.T``."""

    mean: np.ndarray
    W: np.ndarray
    method: str
    regularization: str
    epsilon: float | None
    eigenvalue_floor: float | None
    floor_rule: str
    n_controls: int

    def transform(self, X: np.ndarray) -> np.ndarray:
        """(m, d) -> (m, d) float32 sphered profiles."""
        X = np.asarray(X, dtype=np.float64)
        return ((X - self.mean) @ self.W.T).astype(np.float32)

    def describe(self) -> dict:
        """What was chosen, for the output metadata."""
        return {"method": self.method, "regularization": self.regularization, "epsilon": self.epsilon,
                "eigenvalue_floor": self.eigenvalue_floor, "floor_rule": self.floor_rule,
                "n_controls": self.n_controls}


def knee_index(values: np.ndarray) -> int | None:
    """Kneedle knee of a convex, decreasing curve (e.g. a sorted eigenvalue spectrum).

    Returns the index farthest below the chord from the first to the last point
    after normalising both axes to [0, 1], or None when no point lies below it.
    """
    y = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    n = len(y)
    if n < 3 or y[0] == y[-1]:
        return None
    x = np.linspace(0.0, 1.0, n)
    yn = (y - y[-1]) / (y[0] - y[-1])
    diff = (1.0 - x) - yn
    k = int(np.argmax(diff))
    return k if diff[k] > 1e-12 else None


def fit_sphering(controls: np.ndarray | pd.DataFrame, method: str = "zca-cor", regularization: str = "epsilon",
                 epsilon: float = 1e-6, variance_floor: float = 1e-3) -> Sphering:
    """Fit a ZCA sphering transform on negative-control profiles.

    Parameters
    ----------
    controls : ndarray or DataFrame (n, d), n >= 2
        Feature values only (no metadata columns).
    method : {"zca-cor", "zca"}
    regularization : {"epsilon", "faithful"}
        See the module docstring.
    epsilon : float
        Added to the eigenvalues in the ``epsilon`` mode.
    variance_floor : float
        Floor of the per-feature variances in the ``faithful`` mode.

    Returns
    -------
    Sphering
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if regularization not in REGULARIZATIONS:
        raise ValueError(f"regularization must be one of {REGULARIZATIONS}, not {regularization!r}")
    X = np.asarray(controls, dtype=np.float64)
    if X.ndim != 2 or len(X) < 2:
        raise ValueError(f"need at least 2 control profiles to fit sphering, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("control profiles contain NaN or infinite values")
    mu = X.mean(axis=0)
    Xc = X - mu
    V = Xc.var(axis=0, ddof=1)
    if method == "zca-cor":
        if regularization == "faithful":
            V = np.maximum(V, variance_floor)
        elif (V == 0).any():
            raise ValueError(f"{int((V == 0).sum())} features are constant over the controls: drop them first "
                             "(zca-cor divides by their standard deviation)")
        scale = 1.0 / np.sqrt(V)
        M = (Xc * scale).T @ (Xc * scale) / (len(X) - 1)
    else:
        scale = np.ones_like(V)
        M = Xc.T @ Xc / (len(X) - 1)
    T, G = np.linalg.eigh(M)
    T = np.clip(T, 0.0, None)
    floor, rule = None, "epsilon"
    if regularization == "faithful":
        k = knee_index(T)
        if k is not None:
            floor, rule = np.sort(T)[::-1][k] / 10.0, "knee/10"
        else:
            floor, rule = float(np.median(T)) / 10.0, "median/10 (no knee found)"
        if floor <= 0:
            floor, rule = float(T.max()) * 1e-6, "max*1e-6 (degenerate spectrum)"
        T_reg = np.maximum(T, floor)
    else:
        T_reg = T + epsilon
    W = (G / np.sqrt(T_reg)) @ G.T * scale[None, :]
    return Sphering(mu, W, method, regularization, epsilon if regularization == "epsilon" else None,
                    None if floor is None else float(floor), rule, len(X))


SCOPES = ("plate", "batch", "global")


def fit_and_transform(controls: np.ndarray, X: np.ndarray, method: str = "zca-cor", regularization: str = "epsilon",
                      epsilon: float = 1e-6) -> tuple[np.ndarray, dict]:
    """Fit on ``controls`` (n, d) and sphere ``X`` (m, d); features constant over the controls
    (an empty channel) are only centred.

    Returns the sphered (m, d) float64 array and the fit's description (with ``constant_features``).
    """
    C = np.asarray(controls, np.float64)
    X = np.asarray(X, np.float64)
    varying = C.var(axis=0) > 0
    fit = fit_sphering(C[:, varying], method, regularization, epsilon)
    Y = X - C.mean(axis=0)
    Y[:, varying] = fit.transform(X[:, varying])
    return Y, {**fit.describe(), "constant_features": int((~varying).sum())}


def sphere_profiles(profiles: pd.DataFrame, controls: pd.Series | np.ndarray | None = None, scope: str = "plate",
                    method: str = "zca-cor", regularization: str = "epsilon", epsilon: float = 1e-6,
                    fit_on: pd.DataFrame | None = None, min_controls: int = 2,
                    ) -> tuple[pd.DataFrame, list[dict]]:
    """Sphere profiles with transforms fitted on negative controls, per plate, batch or globally.

    Parameters
    ----------
    profiles : DataFrame
        ``Metadata_*`` columns (``Metadata_Plate``/``Metadata_Batch`` for the scopes) and features.
    controls : boolean mask over ``profiles``, optional
        Which rows are negative controls; default ``Metadata_pert_type == "negcon"``.
        Ignored when ``fit_on`` is given.
    scope : {"plate", "batch", "global"}
        One transform per plate, per batch, or one for everything.
    fit_on : DataFrame, optional
        Control profiles to fit on instead (e.g. control *cells* or sites, when a plate
        has a single control well); same feature columns.
    min_controls : int
        Fewer control rows than this in a scope raise ValueError naming the scope.

    Features that are constant over a scope's controls (an empty channel) are only
    centred; their number is recorded in the fit.

    Returns
    -------
    sphered : DataFrame, same rows and columns as ``profiles``
    fits : list of dict
        One per scope group: ``scope``, ``group``, the fit's :meth:`Sphering.describe`.
    """
    from .aggregate import feature_columns

    if scope not in SCOPES:
        raise ValueError(f"sphering scope must be one of {SCOPES}, not {scope!r}")
    feats = feature_columns(profiles)
    out = profiles.copy()
    out[feats] = out[feats].astype(np.float64)
    if fit_on is None:
        if controls is None:
            if "Metadata_pert_type" not in profiles:
                raise ValueError("no Metadata_pert_type column: cannot find the negative controls to fit sphering on")
            controls = profiles["Metadata_pert_type"].eq("negcon").to_numpy()
        fit_on = profiles[np.asarray(controls, dtype=bool)]
    key = {"plate": "Metadata_Plate", "batch": "Metadata_Batch", "global": None}[scope]
    fits = []
    groups = [(None, profiles.index)] if key is None else list(profiles.groupby(key, sort=True).groups.items())
    for group, index in groups:
        ctrl = fit_on if key is None else fit_on[fit_on[key] == group]
        where = "all plates" if key is None else f"{scope} {group}"
        if len(ctrl) < min_controls:
            raise ValueError(f"{where}: {len(ctrl)} negative-control profile(s), at least {min_controls} needed to fit "
                             f"sphering (use scope 'batch' or 'global', or fit on control cells)")
        Y, described = fit_and_transform(ctrl[feats].to_numpy(np.float64), profiles.loc[index, feats].to_numpy(),
                                         method, regularization, epsilon)
        out.loc[index, feats] = Y
        fits.append({"scope": scope, "group": None if group is None else str(group), **described})
    out[feats] = out[feats].astype(np.float32)
    return out, fits
