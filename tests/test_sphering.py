import numpy as np
import pandas as pd
import pytest
from scipy import linalg

from microsnoop_ray.profiles.sphering import fit_sphering, knee_index
from conftest import shared


@pytest.fixture(scope="module")
def bbbc021_wells():
    """BBBC021 CellProfiler per-well mean profiles joined to their compound (DMSO = negative control)."""
    prof = pd.read_csv(shared("bbbc021_profiles", "ljosa_jbiomolscreen_2013_per_well_mean.csv.gz"))
    img = pd.read_csv(shared("bbbc021_profiles", "BBBC021_v1_image.csv.gz"),
                      usecols=["Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI", "Image_Metadata_Compound"])
    wells = img.drop_duplicates(["Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI"]).rename(columns={
        "Image_Metadata_Plate_DAPI": "Image_Metadata_Plate", "Image_Metadata_Well_DAPI": "Image_Metadata_Well"})
    df = prof.merge(wells, on=["Image_Metadata_Plate", "Image_Metadata_Well"], how="inner")
    feats = [c for c in prof.columns if not c.startswith("Image_Metadata")]
    return df, feats


def test_dmso_wells_have_identity_covariance_after_sphering(bbbc021_wells):
    df, feats = bbbc021_wells
    dmso = df[df["Image_Metadata_Compound"] == "DMSO"]
    assert len(dmso) == 330
    X = dmso[feats].to_numpy()
    # 60 linearly independent features (< 330 wells): CellProfiler has exactly collinear ones
    Z = (X - X.mean(axis=0)) / X.std(axis=0)
    keep = np.sort(linalg.qr(Z, pivoting=True, mode="economic")[2][:60])
    X = X[:, keep]
    sph = fit_sphering(X, method="zca-cor", regularization="epsilon", epsilon=1e-10)
    Y = sph.transform(X).astype(np.float64)
    np.testing.assert_allclose(Y.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(Y, rowvar=False), np.eye(60), atol=2e-3)
    # the drug wells are not whitened by a control fit: their covariance stays far from identity
    drug = sph.transform(df[df["Image_Metadata_Compound"] != "DMSO"][feats].to_numpy()[:, keep])
    assert np.abs(np.cov(drug, rowvar=False) - np.eye(60)).max() > 1.0


def test_zca_cor_matches_an_independent_inverse_square_root(bbbc021_wells):
    df, feats = bbbc021_wells
    X = df[df["Image_Metadata_Compound"] == "DMSO"][feats[:40]].to_numpy()
    eps = 1e-4
    sph = fit_sphering(X, method="zca-cor", regularization="epsilon", epsilon=eps)
    R = np.corrcoef(X, rowvar=False)
    W_ref = np.real(linalg.inv(linalg.sqrtm(R + eps * np.eye(40)))) @ np.diag(1 / X.std(axis=0, ddof=1))
    np.testing.assert_allclose(sph.W, W_ref, rtol=1e-5, atol=1e-6 * np.abs(W_ref).max())
    zca = fit_sphering(X, method="zca", regularization="epsilon", epsilon=eps)
    C = np.cov(X, rowvar=False)
    W_zca = np.real(linalg.inv(linalg.sqrtm(C + eps * np.eye(40))))
    np.testing.assert_allclose(zca.W, W_zca, rtol=1e-4, atol=1e-6 * np.abs(W_zca).max())


def test_faithful_regularisation_floors_at_the_knee(bbbc021_wells):
    df, feats = bbbc021_wells
    X = df[df["Image_Metadata_Compound"] == "DMSO"][feats].to_numpy()
    sph = fit_sphering(X, regularization="faithful")
    V = X.var(axis=0, ddof=1)
    assert (V < 1e-3).sum() > 100  # the reference's absolute variance floor is active for many features
    Z = (X - X.mean(axis=0)) / np.sqrt(np.maximum(V, 1e-3))
    T = np.sort(np.clip(np.linalg.eigvalsh(Z.T @ Z / (len(X) - 1)), 0, None))[::-1]
    assert sph.floor_rule == "knee/10"
    assert sph.eigenvalue_floor == pytest.approx(T[knee_index(T)] / 10, rel=1e-6)
    assert sph.describe()["regularization"] == "faithful"


def test_knee_of_known_curves():
    # normalised distances below the chord: index 1 -> 0.739, index 2 -> 0.663
    assert knee_index(np.array([100.0, 10, 1, 0.9, 0.8, 0.7, 0.6])) == 1
    assert knee_index(np.array([10.0, 9.9, 9.8, 9.7, 1.0, 0.9, 0.8])) == 4
    assert knee_index(np.linspace(10, 1, 10)) is None  # a straight line has no knee
    assert knee_index(np.ones(5)) is None


def test_bad_control_sets_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        fit_sphering(np.ones((1, 3)))
    X = np.random.default_rng(0).normal(size=(10, 3))
    X[:, 1] = 5.0
    with pytest.raises(ValueError, match="constant"):
        fit_sphering(X)
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_sphering(X)


def _low_rank_controls(n, d, rank=5, seed=0):
    """``n`` profiles of ``d`` features: ``rank`` strong shared directions plus weak independent noise."""
    rng = np.random.default_rng(seed)
    loadings = rng.normal(size=(rank, d))
    return lambda m: rng.normal(size=(m, rank)) @ loadings * 3.0 + rng.normal(size=(m, d)) * 0.5 + 10.0


def test_fewer_controls_than_features_stays_finite_and_whitens_their_span():
    draw = _low_rank_controls(20, 60)
    C, held = draw(20), draw(200)
    fit = fit_sphering(C, regularization="shrinkage")
    d = fit.describe()
    assert d["regularization"] == "shrinkage" and d["floor_rule"] == "ledoit-wolf"
    assert d["n_controls"] == 20 and d["n_features"] == 60 and d["fewer_controls_than_features"]
    assert d["rank"] == 19  # centred controls span n - 1 directions
    assert d["condition_number_before"] is None  # singular
    assert 0 < d["shrinkage"] < 0.99 and d["epsilon"] > 0.01 and np.isfinite(d["condition_number_after"])
    assert 1 < d["effective_rank"] < 19
    Y = fit.transform(C).astype(np.float64)
    assert np.isfinite(Y).all() and np.isfinite(fit.W).all()
    # the controls' strong directions come out with variance close to 1 (T / (T + epsilon))
    Z = (C - C.mean(0)) / C.std(0, ddof=1)
    T, G = np.linalg.eigh(Z.T @ Z / 19)
    strong = T > 20 * d["epsilon"]
    assert strong.sum() >= 3
    # Y = Z G diag(1 / sqrt(T + epsilon)) G^T: along the eigenvectors G its variance is T / (T + epsilon)
    var = np.var(Y @ G[:, strong], axis=0, ddof=1)
    np.testing.assert_array_less(var, 1.0 + 1e-9)
    assert var.min() > 0.9
    # profiles the fit did not see are not blown up: a fixed epsilon of 1e-6 amplifies the unspanned directions
    per_feature = lambda f: float(np.mean(f.transform(held).astype(np.float64) ** 2))
    assert per_feature(fit) < 5.0
    assert per_feature(fit_sphering(C, regularization="epsilon", epsilon=1e-6)) > 1000.0


def test_shrinkage_vanishes_with_many_controls():
    rng = np.random.default_rng(1)
    A = np.eye(8) + 0.4 * rng.normal(size=(8, 8))  # correlated, not degenerate
    C = rng.normal(size=(20000, 8)) @ A
    fit = fit_sphering(C, regularization="shrinkage")
    assert fit.describe()["shrinkage"] < 0.01 and not fit.describe()["fewer_controls_than_features"]
    Y = fit.transform(C).astype(np.float64)
    np.testing.assert_allclose(np.cov(Y, rowvar=False), np.eye(8), atol=0.02)
    assert fit.describe()["condition_number_before"] > fit.describe()["condition_number_after"]


def test_epsilon_mode_records_its_epsilon_and_refuses_it_elsewhere():
    X = np.random.default_rng(2).normal(size=(30, 5))
    assert fit_sphering(X, regularization="epsilon").describe()["epsilon"] == 1e-6  # pycytominer's default
    assert fit_sphering(X, regularization="epsilon", epsilon=0.5).describe()["epsilon"] == 0.5
    with pytest.raises(ValueError, match="only used with regularization 'epsilon'"):
        fit_sphering(X, regularization="shrinkage", epsilon=1e-3)


def test_scopes_warn_when_controls_are_fewer_than_features(caplog):
    from microsnoop_ray.profiles.sphering import sphere_profiles

    draw = _low_rank_controls(10, 30, seed=3)
    df = pd.DataFrame(draw(40), columns=[f"f{i}" for i in range(30)]).assign(
        Metadata_Plate=["P1"] * 20 + ["P2"] * 20, Metadata_pert_type=(["negcon"] * 10 + ["trt"] * 10) * 2)
    with caplog.at_level("WARNING"):
        out, fits = sphere_profiles(df, scope="plate")
    assert [f["group"] for f in fits] == ["P1", "P2"]
    assert all("10 controls for 30 varying features" in f["warning"] for f in fits)
    assert "plate P1: 10 controls for 30" in caplog.text
    assert np.isfinite(out[[f"f{i}" for i in range(30)]].to_numpy()).all()


def test_default_never_weights_a_direction_above_standardisation():
    draw = _low_rank_controls(20, 60, seed=4)
    C, held = draw(20), draw(100)
    fit = fit_sphering(C)
    d = fit.describe()
    assert d["regularization"] == "mean-eigenvalue" and d["epsilon"] == pytest.approx(1.0)  # mean eigenvalue of R
    assert d["fewer_controls_than_features"] and d["rank"] == 19
    # ||W^T v|| <= ||v / sd|| for every v: the singular values of W diag(sd) are 1 / sqrt(T + 1) <= 1
    sd = C.std(0, ddof=1)
    assert np.linalg.svd(fit.W * sd[None, :], compute_uv=False).max() <= 1.0 + 1e-9
    Zh = (held - C.mean(0)) / sd
    Yh = fit.transform(held).astype(np.float64)
    assert np.all(np.linalg.norm(Yh, axis=1) <= np.linalg.norm(Zh, axis=1) * (1 + 1e-5))
    # the strong directions of the controls are whitened: variance T / (T + 1) along them
    Z = (C - C.mean(0)) / sd
    T, G = np.linalg.eigh(Z.T @ Z / 19)
    Y = fit.transform(C).astype(np.float64)
    strong = T > 20
    np.testing.assert_allclose(np.var(Y @ G[:, strong], axis=0, ddof=1), T[strong] / (T[strong] + 1), rtol=1e-4)
    # zca: epsilon is the covariance's mean eigenvalue, the mean feature variance
    zca = fit_sphering(C, method="zca")
    assert zca.describe()["epsilon"] == pytest.approx(C.var(0, ddof=1).mean())
