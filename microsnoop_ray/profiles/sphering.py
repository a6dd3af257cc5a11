"""ZCA sphering fitted on negative controls (``docs/METHOD.md`` section 5).

Fitted on control profiles ``X`` (n x d): centre on the control mean ``mu``,
per-feature variances ``V`` (ddof 1), and for ``zca-cor`` the eigendecomposition
of the correlation matrix ``R = G diag(T) G^T``; the transform is
``W = G diag(1/sqrt(T_reg)) G^T diag(1/sqrt(V))`` and ``Y = (X - mu) W^T``.
``zca`` uses the covariance matrix and no per-feature scaling.

Regularisation of the eigenvalues ``T``:

``"mean-eigenvalue"`` (default)
    ``T_reg = T + mean(T)``: epsilon is the mean eigenvalue of the controls'
    correlation (``zca-cor``: exactly 1) or covariance (``zca``) matrix. Why this
    rule: with ``n`` controls and ``d`` features the sample spectrum is badly
    spread unless ``n >> d`` (Marchenko-Pastur), and with ``n <= d`` at least
    ``d - n + 1`` directions have no control variance at all. A fixed epsilon
    such as 1e-6 multiplies those unestimated directions by up to
    ``1/sqrt(1e-6)`` = 1000, so the profiles' noise there dominates every
    distance. Epsilon = mean(T) is the smallest value for which no direction is
    weighted more than plain standardisation would weight it (``1/sqrt(T + eps)
    <= 1/sqrt(mean(T))``): sphering can then only *down*-weight the directions
    in which the controls vary strongly (they are whitened, ``T / (T + eps)`` ~ 1
    for ``T >> mean(T)``), never blow up the ones they do not span. It is
    scale-free, needs no tuning and is the same rule for a plate with six
    control wells, a batch and a whole screen; it equals inverting an even
    shrinkage ``(R + mean(T) I) / 2`` of the correlation matrix towards the
    identity. The price: with very many controls the weak directions are only
    partly whitened (``T / (T + mean(T))``); ``"shrinkage"`` adapts to ``n``.
``"shrinkage"``
    ``T_reg = T + epsilon`` with ``epsilon = mean(T) * a / (1 - a)``, where ``a``
    is the Ledoit-Wolf (2004) shrinkage intensity of the controls' (standardised,
    for ``zca-cor``) covariance towards ``mean(T) I`` (capped at 0.99). The
    Ledoit-Wolf estimate ``(1 - a) R + a mean(T) I`` has eigenvalues
    ``(1 - a) (T + epsilon)``; the global factor is dropped so that
    well-estimated directions keep unit variance. The shrinkage grows as
    ``n / d`` falls and vanishes as ``n`` grows, but Ledoit-Wolf minimises the
    error of the covariance itself, not of its inverse square root, and on
    strongly correlated features (CellProfiler's, effective rank ~12 of 516) it
    shrinks little: 0.26 for 330 controls of 516 features.
``"epsilon"`` (pycytominer; ``epsilon=1e-6`` reproduces its default)
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

Every fit records its diagnostics (:meth:`Sphering.describe`): controls,
features, numerical and effective rank of the controls, condition numbers
before and after regularisation and the epsilon used, with a warning when
there are fewer controls than features.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd
from .controls import negative_controls

METHODS = ("zca-cor", "zca")
REGULARIZATIONS = ("mean-eigenvalue", "shrinkage", "epsilon", "faithful")
DEFAULT_REGULARIZATION = "mean-eigenvalue"
DEFAULT_EPSILON = 1e-6  # the "epsilon" mode's default, as pycytominer
MAX_SHRINKAGE = 0.99

log = logging.getLogger(__name__)


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
    diagnostics: dict = dataclasses.field(default_factory=dict)

    def transform(self, X: np.ndarray) -> np.ndarray:
        """(m, d) -> (m, d) float32 sphered profiles."""
        X = np.asarray(X, dtype=np.float64)
        return ((X - self.mean) @ self.W.T).astype(np.float32)

    def describe(self) -> dict:
        """What was chosen, for the output metadata."""
        return {"method": self.method, "regularization": self.regularization, "epsilon": self.epsilon,
                "eigenvalue_floor": self.eigenvalue_floor, "floor_rule": self.floor_rule,
                "n_controls": self.n_controls, **self.diagnostics}


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


def spectrum_diagnostics(T: np.ndarray, T_reg: np.ndarray, n_controls: int) -> dict:
    """Diagnostics of one fit from the eigenvalues before (``T``) and after (``T_reg``) regularisation.

    ``rank`` is the numerical rank of the controls' matrix (eigenvalues above
    ``max(T) * d * machine epsilon``); ``effective_rank`` is ``exp`` of the
    entropy of the normalised spectrum (Roy and Vetterli 2007). Condition numbers
    are ``max / min`` eigenvalue, None (infinite) when the matrix is singular.
    """
    T = np.asarray(T, np.float64)
    d = len(T)
    top = float(T.max()) if d else 0.0
    tol = top * d * np.finfo(np.float64).eps
    rank = int((T > tol).sum())
    p = T[T > tol] / T[T > tol].sum() if rank else np.ones(1)
    low = float(T.min()) if d else 0.0
    return {"n_features": int(d), "rank": rank, "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
            "condition_number_before": top / low if low > tol else None,
            "condition_number_after": float(T_reg.max() / T_reg.min()),
            "fewer_controls_than_features": bool(n_controls < d)}


def shrinkage_intensity(Z: np.ndarray) -> float:
    """Ledoit-Wolf shrinkage intensity (in [0, 1]) of the covariance of ``Z`` (n, d) towards ``mean(T) I``."""
    from sklearn.covariance import ledoit_wolf_shrinkage

    return float(ledoit_wolf_shrinkage(Z, assume_centered=True))


def fit_sphering(controls: np.ndarray | pd.DataFrame, method: str = "zca-cor",
                 regularization: str = DEFAULT_REGULARIZATION, epsilon: float | None = None,
                 variance_floor: float = 1e-3) -> Sphering:
    """Fit a ZCA sphering transform on negative-control profiles.

    Parameters
    ----------
    controls : ndarray or DataFrame (n, d), n >= 2
        Feature values only (no metadata columns).
    method : {"zca-cor", "zca"}
    regularization : {"mean-eigenvalue", "shrinkage", "epsilon", "faithful"}
        See the module docstring; ``mean-eigenvalue`` is the default.
    epsilon : float, optional
        Added to the eigenvalues in the ``epsilon`` mode (default 1e-6, as pycytominer);
        not allowed with the other modes, which choose their own floor.
    variance_floor : float
        Floor of the per-feature variances in the ``faithful`` mode.

    Returns
    -------
    Sphering
        Its ``describe()`` holds the epsilon actually used and the diagnostics of
        :func:`spectrum_diagnostics`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if regularization not in REGULARIZATIONS:
        raise ValueError(f"regularization must be one of {REGULARIZATIONS}, not {regularization!r}")
    if epsilon is not None and regularization != "epsilon":
        raise ValueError(f"epsilon={epsilon} is only used with regularization 'epsilon', not {regularization!r}")
    X = np.asarray(controls, dtype=np.float64)
    if X.ndim != 2 or len(X) < 2:
        raise ValueError(f"need at least 2 control profiles to fit sphering, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("control profiles contain NaN or infinite values")
    mu = X.mean(axis=0)
    Xc = X - mu
    scale = _feature_scale(Xc.var(axis=0, ddof=1), method, regularization, variance_floor)
    Z = Xc * scale
    T, G = np.linalg.eigh(Z.T @ Z / (len(X) - 1))
    T = np.clip(T, 0.0, None)
    T_reg, floor, rule, used_eps, shrink = _regularized(T, Z, regularization, epsilon)
    W = (G / np.sqrt(T_reg)) @ G.T * scale[None, :]
    diag = spectrum_diagnostics(T, T_reg, len(X))
    if shrink is not None:
        diag["shrinkage"] = shrink
    return Sphering(mu, W, method, regularization, used_eps, None if floor is None else float(floor), rule, len(X),
                    diag)


def _feature_scale(V: np.ndarray, method: str, regularization: str, variance_floor: float) -> np.ndarray:
    """What each centred feature is multiplied by before the eigen-decomposition: 1/SD for ``zca-cor``
    (the variances floored in the ``faithful`` mode), 1 for ``zca``."""
    if method != "zca-cor":
        return np.ones_like(V)
    if regularization == "faithful":
        V = np.maximum(V, variance_floor)
    elif (V == 0).any():
        raise ValueError(f"{int((V == 0).sum())} features are constant over the controls: drop them first "
                         "(zca-cor divides by their standard deviation)")
    return 1.0 / np.sqrt(V)


def _regularized(T: np.ndarray, Z: np.ndarray, regularization: str, epsilon: float | None) -> tuple:
    """The regularised eigenvalues and how: ``(T_reg, floor, rule, epsilon used, shrinkage)``."""
    if regularization == "faithful":
        k = knee_index(T)
        if k is not None:
            floor, rule = np.sort(T)[::-1][k] / 10.0, "knee/10"
        else:
            floor, rule = float(np.median(T)) / 10.0, "median/10 (no knee found)"
        if floor <= 0:
            floor, rule = float(T.max()) * 1e-6, "max*1e-6 (degenerate spectrum)"
        return np.maximum(T, floor), floor, rule, None, None
    shrink, rule = None, "epsilon"
    if regularization == "mean-eigenvalue":
        used_eps, rule = float(T.mean()), "mean eigenvalue"
        if used_eps <= 0:
            raise ValueError("the controls have no variance in any feature: nothing to sphere")
    elif regularization == "shrinkage":
        shrink = min(shrinkage_intensity(Z), MAX_SHRINKAGE)
        used_eps, rule = float(T.mean()) * shrink / (1.0 - shrink), "ledoit-wolf"
        if used_eps <= 0:  # a spectrum with no spread at all (e.g. one control direction): keep it finite
            used_eps, rule = float(T.max()) * 1e-6 or 1e-6, "max*1e-6 (no shrinkage estimated)"
    else:
        used_eps = DEFAULT_EPSILON if epsilon is None else float(epsilon)
    return T + used_eps, None, rule, used_eps, shrink


SCOPES = ("plate", "batch", "global")


def fit_and_transform(controls: np.ndarray, X: np.ndarray, method: str = "zca-cor",
                      regularization: str = DEFAULT_REGULARIZATION, epsilon: float | None = None,
                      ) -> tuple[np.ndarray, dict]:
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


def _described(scope: str, group, where: str, described: dict, regularization: str) -> dict:
    """One fit as ``summary.json`` and the Parquet metadata keep it, with a warning (logged) when the
    controls are fewer than the features."""
    fit = {"scope": scope, "group": None if group is None else str(group), **described}
    if fit["fewer_controls_than_features"]:
        fit["warning"] = (f"{where}: {fit['n_controls']} controls for {fit['n_features']} varying features "
                          f"(rank {fit['rank']}): the controls do not span every direction; "
                          f"regularisation {regularization} (epsilon {fit['epsilon']})")
        log.warning("sphering %s", fit["warning"])
    return fit


def sphere_profiles(profiles: pd.DataFrame, controls: pd.Series | np.ndarray | None = None, scope: str = "plate",
                    method: str = "zca-cor", regularization: str = DEFAULT_REGULARIZATION,
                    epsilon: float | None = None,
                    fit_on: pd.DataFrame | None = None, min_controls: int = 2,
                    ) -> tuple[pd.DataFrame, list[dict]]:
    """Sphere profiles with transforms fitted on negative controls, per plate, batch or globally.

    Parameters
    ----------
    profiles : DataFrame
        ``Metadata_*`` columns (``Metadata_Plate``/``Metadata_Batch`` for the scopes) and features.
    controls : boolean mask over ``profiles``, optional
        Which rows are negative controls; default :func:`~microsnoop_ray.profiles.controls.negative_controls`.
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
    X = profiles[feats].to_numpy(np.float64)
    sphered = X.copy()  # one array, written per group: pandas would check dtypes column by column
    if fit_on is None:
        if controls is None:
            if "Metadata_pert_type" not in profiles:
                raise ValueError("no Metadata_pert_type column: cannot find the negative controls to fit sphering on")
            controls = negative_controls(profiles)
        fit_on = profiles[np.asarray(controls, dtype=bool)]
    key = {"plate": "Metadata_Plate", "batch": "Metadata_Batch", "global": None}[scope]
    fits = []
    groups = ([(None, np.arange(len(profiles)))] if key is None
              else sorted(profiles.groupby(key).indices.items(), key=lambda kv: kv[0]))  # positions, not labels
    for group, rows in groups:
        ctrl = fit_on if key is None else fit_on[fit_on[key] == group]
        where = "all plates" if key is None else f"{scope} {group}"
        if len(ctrl) < min_controls:
            raise ValueError(f"{where}: {len(ctrl)} negative-control profile(s), at least {min_controls} needed to fit "
                             f"sphering (use scope 'batch' or 'global', or fit on control cells)")
        sphered[rows], described = fit_and_transform(ctrl[feats].to_numpy(np.float64), X[rows], method,
                                                     regularization, epsilon)
        fits.append(_described(scope, group, where, described, regularization))
    out = profiles.copy()
    out[feats] = sphered.astype(np.float32)
    return out, fits
