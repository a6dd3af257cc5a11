"""Aggregation cell -> site -> well -> treatment, and scoped sphering."""
import numpy as np
import pandas as pd
import pytest

from microsnoop_ray.profiles.aggregate import aggregate, treatment_profiles
from microsnoop_ray.profiles.sphering import sphere_profiles


def _cells(rng, n=60):
    return pd.DataFrame({"Metadata_Plate": rng.choice(["P1", "P2"], n), "Metadata_Well": rng.choice(["A01", "B02"], n),
                         "Metadata_Compound": "x", "Metadata_Tag": rng.integers(0, 3, n),
                         "f0": rng.normal(size=n), "f1": rng.normal(size=n)})


@pytest.mark.parametrize("method", ["mean", "median"])
def test_aggregate_matches_a_hand_computation(method):
    df = pd.DataFrame({"Metadata_Well": ["A01", "A01", "A01", "B02"], "Metadata_Compound": ["x", "x", "x", "y"],
                       "f0": [1.0, 2.0, 9.0, 4.0], "f1": [0.0, 0.0, 3.0, 1.0]})
    out = aggregate(df, ["Metadata_Well"], method).set_index("Metadata_Well")
    expect = {"mean": (4.0, 1.0), "median": (2.0, 0.0)}[method]
    assert tuple(out.loc["A01", ["f0", "f1"]]) == expect
    assert out.loc["A01", "Metadata_Object_Count"] == 3 and out.loc["B02", "Metadata_Compound"] == "y"
    assert out["f0"].dtype == np.float32


def test_counts_add_up_across_levels_and_varying_metadata_is_dropped():
    rng = np.random.default_rng(1)
    cells = _cells(rng)
    sites = aggregate(cells, ["Metadata_Plate", "Metadata_Well"], "mean")
    assert "Metadata_Tag" not in sites  # varies inside a group: not carried
    plates = aggregate(sites, ["Metadata_Plate"], "mean")
    assert plates["Metadata_Object_Count"].sum() == len(cells)


def test_dask_gives_the_pandas_result():
    import dask.dataframe as dd

    cells = _cells(np.random.default_rng(2), 500)
    ref = aggregate(cells, ["Metadata_Plate", "Metadata_Well"], "mean")
    out = aggregate(dd.from_pandas(cells, npartitions=4), ["Metadata_Plate", "Metadata_Well"], "mean")
    pd.testing.assert_frame_equal(out[ref.columns], ref, check_dtype=False)


def test_treatments_leave_out_negative_controls():
    wells = pd.DataFrame({"Metadata_Compound": ["DMSO", "a", "a", "b"], "Metadata_Concentration": [0, 1, 1, 1],
                          "Metadata_pert_type": ["negcon", "trt", "trt", "trt"], "Metadata_Well": list("WXYZ"),
                          "f0": [5.0, 1.0, 3.0, 7.0]})
    t = treatment_profiles(wells)
    assert t["Metadata_Compound"].tolist() == ["a", "b"]
    assert t["f0"].tolist() == [2.0, 7.0] and t["Metadata_Well_Count"].tolist() == [2, 1]


def test_plate_scope_whitens_each_plates_controls_and_records_the_fits():
    rng = np.random.default_rng(3)
    parts = []
    for plate, shift, scale in (("P1", 0.0, 1.0), ("P2", 5.0, 3.0)):
        X = rng.normal(size=(80, 4)) @ rng.normal(size=(4, 4)) * scale + shift
        parts.append(pd.DataFrame(X, columns=[f"f{i}" for i in range(4)]).assign(
            Metadata_Plate=plate, Metadata_Batch="B", Metadata_pert_type=["negcon"] * 60 + ["trt"] * 20))
    df = pd.concat(parts, ignore_index=True)
    # a fixed tiny epsilon whitens exactly (60 controls for 4 features: the default epsilon is the mean eigenvalue)
    out, fits = sphere_profiles(df, scope="plate", regularization="epsilon", epsilon=1e-9)
    assert [f["group"] for f in fits] == ["P1", "P2"] and all(f["n_controls"] == 60 for f in fits)
    for plate in ("P1", "P2"):
        ctrl = out[(out.Metadata_Plate == plate) & (out.Metadata_pert_type == "negcon")][[f"f{i}" for i in range(4)]]
        np.testing.assert_allclose(np.cov(ctrl.to_numpy(np.float64).T), np.eye(4), atol=1e-4)
        np.testing.assert_allclose(ctrl.mean().to_numpy(), 0, atol=1e-5)
    _, gfits = sphere_profiles(df, scope="global")
    assert len(gfits) == 1 and gfits[0]["n_controls"] == 120


def test_a_plate_without_controls_is_named():
    df = pd.DataFrame({"Metadata_Plate": ["P1"] * 4 + ["P2"] * 2, "Metadata_pert_type": ["negcon"] * 4 + ["trt"] * 2,
                       "f0": [1.0, 2.0, 3.0, 5.0, 1.0, 1.0], "f1": [0.0, 1.0, 0.0, 2.0, 3.0, 1.0]})
    with pytest.raises(ValueError, match="plate P2: 0 negative-control"):
        sphere_profiles(df, scope="plate")


def test_constant_features_and_empty_channels_are_named():
    from microsnoop_ray.io.sources import PlateInfo
    from microsnoop_ray.pipeline.postprocess import constant_features

    rng = np.random.default_rng(0)
    feats = {f"Microsnoop_{ch}_{i:03d}": (np.zeros(6) if ch == "RGB2" else rng.normal(size=6))
             for ch in ("DNA", "RGB2") for i in range(4)}
    feats["Microsnoop_DNA_003"] = np.full(6, 0.5)  # one constant feature of a live channel
    sites = pd.DataFrame({"Metadata_Plate": ["P1"] * 6, "Metadata_Well": list("AABBCC"), **feats})
    plates = {"P1": PlateInfo("P1", "b", ["DNA", "RGB2"], "src", [])}
    found = constant_features(sites, plates)
    assert found["P1"]["n_features"] == 5 and found["P1"]["channels"] == ["RGB2"]
    assert "Microsnoop_DNA_003" in found["P1"]["features"]
    varied = sites.assign(Microsnoop_DNA_003=np.arange(6.0), **{f"Microsnoop_RGB2_{i:03d}": np.arange(6.0)
                                                               for i in range(4)})
    assert constant_features(varied, plates) == {}
