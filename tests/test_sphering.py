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
    sph = fit_sphering(X, method="zca-cor", epsilon=1e-10)
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
    sph = fit_sphering(X, method="zca-cor", epsilon=eps)
    R = np.corrcoef(X, rowvar=False)
    W_ref = np.real(linalg.inv(linalg.sqrtm(R + eps * np.eye(40)))) @ np.diag(1 / X.std(axis=0, ddof=1))
    np.testing.assert_allclose(sph.W, W_ref, rtol=1e-5, atol=1e-6 * np.abs(W_ref).max())
    zca = fit_sphering(X, method="zca", epsilon=eps)
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
