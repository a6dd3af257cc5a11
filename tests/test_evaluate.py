"""kNN vote rule of METHOD.md section 6 on hand-computed cases."""
import numpy as np
import pandas as pd
import pytest

from conftest import SHARED, shared

from microsnoop_ray.evaluate import knn_accuracy, knn_predict


def test_majority_ties_to_smallest_label_and_distinct_votes_to_nearest():
    # point 0 at x=0; neighbours at 1 (label 2), 2 (label 1), 3 (label 2), 4 (label 1)
    X = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])
    y = np.array([0, 2, 1, 2, 1])
    assert knn_predict(X, y, k=4)[0] == 1  # 2 votes each for labels 1 and 2 -> smallest label
    assert knn_predict(X, y, k=3)[0] == 2  # labels 2, 1, 2 -> majority 2
    y2 = np.array([0, 5, 3, 4, 1])
    assert knn_predict(X, y2, k=3)[0] == 5  # 5, 3, 4 all distinct -> the nearest one's label
    assert knn_predict(X, y2, k=1)[0] == 5


def test_accuracy_per_class_and_f1():
    X = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [0.15]])
    y = np.array([0, 0, 0, 1, 1, 1])
    # 1-NN by hand: 0->0.1 (0), 0.1->0.15 (1), 0.2->0.15 (1), 5->5.1 (1), 5.1->5 (1),
    # 0.15->0.1 (0; tie with 0.2 goes to the earlier index)
    assert knn_predict(X, y, k=1).tolist() == [0, 1, 1, 1, 1, 0]
    r = knn_accuracy(X, y, k=1)
    assert r["accuracy"] == 0.5
    assert r["per_class"] == {"0": 1 / 3, "1": 2 / 3}
    f1_0 = 2 * 0.5 * (1 / 3) / (0.5 + 1 / 3)
    f1_1 = 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)
    assert abs(r["macro_f1"] - (f1_0 + f1_1) / 2) < 1e-12


# --- MLP, silhouette -----------------------------------------------------------------------

def test_mlp_five_fold_on_separable_classes_and_too_small_class():
    from microsnoop_ray.evaluate import mlp_accuracy

    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 0.1, (20, 3)), rng.normal(5, 0.1, (20, 3))])
    y = np.array(["a"] * 20 + ["b"] * 20)
    r = mlp_accuracy(X, y, folds=5)
    assert r["accuracy"] == 1.0 and r["sd"] == 0.0 and len(r["fold_accuracy"]) == 5
    assert r["per_class"] == {"a": 1.0, "b": 1.0}
    with pytest.raises(ValueError, match="fewer than the 5 folds"):
        mlp_accuracy(X[:24], y[:24], folds=5)  # class b has 4 members


def test_silhouette_by_hand():
    from microsnoop_ray.evaluate import silhouette

    X = np.array([[0.0], [1.0], [10.0], [11.0]])
    y = np.array([0, 0, 1, 1])
    # every point: a = 1 (its partner), b = mean distance to the other pair = 10.5 (0 -> 10, 11)
    # for 0: (10 + 11) / 2 = 10.5; for 1: (9 + 10) / 2 = 9.5; symmetric for the other pair
    s = [(10.5 - 1) / 10.5, (9.5 - 1) / 9.5, (9.5 - 1) / 9.5, (10.5 - 1) / 10.5]
    assert abs(silhouette(X, y, metric="euclidean") - np.mean(s)) < 1e-12


# --- NSC / NSCB ----------------------------------------------------------------------------

def _treatments(rows):
    return pd.DataFrame(rows, columns=["Metadata_Compound", "Metadata_moa", "Metadata_NSCB_Batch", "f0", "f1"])


def test_nsc_excludes_own_compound_and_nscb_own_batch_and_single_batch_moas():
    from microsnoop_ray.evaluate import not_same_compound

    t = _treatments([            # angles: 0, 0.6, 3, 20.6, 90, 180, -73.3 degrees
        ("c1", "X", "W1", 1.0, 0.0),
        ("c1", "X", "W1", 1.0, 0.01),
        ("c2", "X", "W1", 0.95, 0.05),
        ("c3", "Y", "W2", 0.8, 0.3),
        ("c4", "X", "W2", 0.0, 1.0),
        ("c5", "Z", "W3", -1.0, 0.0),  # Z only in W3: dropped by NSCB
        ("c6", "Y", "W3", 0.3, -1.0),
    ])
    nsc = not_same_compound(t)
    # NSC by hand (cosine = angle): c1 rows -> c2 (X) right; c2 -> c1 (X) right; c3 -> c2 (X) wrong;
    # c4 -> c3 (Y) wrong; c5 -> c4 (90 deg away, c6 is 107) X wrong; c6 -> c1 (X) wrong
    assert nsc["correct"] == 3 and nsc["total"] == 7
    assert [f["Metadata_Compound"] for f in nsc["failed"]] == ["c3", "c4", "c5", "c6"]
    assert nsc["failed"][0]["nearest_compound"] == "c2" and nsc["failed"][0]["nearest_moa"] == "X"
    nscb = not_same_compound(t, batch="Metadata_NSCB_Batch")
    assert nscb["dropped_moas"] == ["Z"] and nscb["total"] == 6
    # NSCB by hand: c1 rows and c2 (W1) -> c3 (Y) wrong; c3 (W2) -> c2 (X) wrong;
    # c4 (W2) -> c2 (X) right; c6 (W3) -> c1 (X) wrong
    assert nscb["correct"] == 1
    assert [f["Metadata_Compound"] for f in nscb["failed"]] == ["c1", "c1", "c2", "c3", "c6"]


def test_treatment_batches_week_and_plate_rules():
    from microsnoop_ray.evaluate import treatment_batches

    wells = pd.DataFrame({"Metadata_Compound": ["a", "a", "b"], "Metadata_Concentration": [1.0, 1.0, 2.0],
                          "Metadata_Batch": ["Week2", "Week1", "Week1"],
                          "Metadata_Plate": ["Week2_1", "Week1_7", "Week1_7"]})
    wk = treatment_batches(wells, rule="batch").set_index("Metadata_Compound")["Metadata_NSCB_Batch"]
    assert wk.to_dict() == {"a": "Week1|Week2", "b": "Week1"}
    pl = treatment_batches(wells, rule="plate").set_index("Metadata_Compound")["Metadata_NSCB_Batch"]
    assert pl.to_dict() == {"a": "Week1_7|Week2_1", "b": "Week1_7"}


def _independent_nsc(treat: pd.DataFrame, exclude_batch: bool):
    """A second NSC written from METHOD.md with plain loops (no shared code with the package)."""
    feats = [c for c in treat.columns if not c.startswith("Metadata_")]
    rows = treat.to_dict("records")
    if exclude_batch:
        weeks = {}
        for r in rows:
            weeks.setdefault(r["Metadata_moa"], set()).add(r["Metadata_Batch"])
        rows = [r for r in rows if len(weeks[r["Metadata_moa"]]) > 1]
    vec = [np.array([r[f] for f in feats]) for r in rows]
    correct = 0
    for i, r in enumerate(rows):
        best, best_sim = None, -2.0
        for j, s in enumerate(rows):
            if s["Metadata_Compound"] == r["Metadata_Compound"]:
                continue
            if exclude_batch and s["Metadata_Batch"] == r["Metadata_Batch"]:
                continue
            sim = vec[i] @ vec[j] / np.linalg.norm(vec[i]) / np.linalg.norm(vec[j])
            if sim > best_sim:
                best, best_sim = s, sim
        correct += best["Metadata_moa"] == r["Metadata_moa"]
    return correct, len(rows)


def test_nsc_on_bbbc021_cellprofiler_profiles_matches_an_independent_computation():
    from microsnoop_ray.evaluate import nsc_nscb, treatment_batches
    from microsnoop_ray.evaluate.suites import load_bbbc021_well_profiles
    from microsnoop_ray.profiles.aggregate import treatment_profiles
    from microsnoop_ray.profiles.sphering import sphere_profiles

    shared("bbbc021_profiles")
    wells = load_bbbc021_well_profiles(SHARED)
    assert len(wells) == 632 and wells["Metadata_pert_type"].eq("negcon").sum() == 330
    sphered, _ = sphere_profiles(wells, scope="global")
    keys = ["Metadata_Compound", "Metadata_Concentration"]
    treat = treatment_profiles(sphered, keys).merge(treatment_batches(wells[wells.Metadata_pert_type == "trt"]),
                                                    on=keys)
    assert len(treat) == 103
    res = nsc_nscb(treat)
    assert res["nscb"]["dropped_moas"] == ["Cholesterol-lowering", "Kinase inhibitors"]
    assert res["nscb"]["total"] == 92
    ind = treat.drop(columns="Metadata_NSCB_Batch")
    assert (res["nsc"]["correct"], res["nsc"]["total"]) == _independent_nsc(ind, False)
    assert (res["nscb"]["correct"], res["nscb"]["total"]) == _independent_nsc(ind, True)
    assert res["nsc"]["correct"] > 0.7 * 103  # sphered CellProfiler profiles match most MoAs


# --- copairs mAP ---------------------------------------------------------------------------

def _angle_rows(angles_deg):
    a = np.deg2rad(np.asarray(angles_deg, float))
    return np.cos(a), np.sin(a)


def test_activity_map_by_hand():
    from microsnoop_ray.evaluate import activity_map

    # a1 at 0 deg, a2 at 40, controls at -20 and 180 (cosine = cos of the angle between them)
    # a1: C1 (cos 20) > a2 (cos 40) > C2 -> AP = 1/2; a2: a1 (cos 40) > C1 (cos 60) > C2 -> AP = 1
    x, y = _angle_rows([0, 40, -20, 180])
    df = pd.DataFrame({"Metadata_Compound": ["A", "A", "DMSO", "DMSO"],
                       "Metadata_pert_type": ["trt", "trt", "negcon", "negcon"],
                       "Metadata_Plate": "P1", "f0": x, "f1": y})
    r = activity_map(df, "Metadata_Compound", null_size=2000)
    assert r["n_groups"] == 1 and abs(r["mean_map"] - 0.75) < 1e-12
    # controls on another plate are not negatives of plate P1's treatments
    df2 = pd.concat([df, df.assign(Metadata_Plate="P2", Metadata_Compound=["B", "B", "DMSO", "DMSO"],
                                   f0=[1.0, 0.99, -1.0, -0.99], f1=[0.0, 0.1, 0.0, 0.1])], ignore_index=True)
    r2 = activity_map(df2, "Metadata_Compound", null_size=2000)
    per = {g["Metadata_Compound"]: g["mean_average_precision"] for g in r2["per_group"]}
    assert abs(per["A"] - 0.75) < 1e-12 and per["B"] == 1.0


def test_consistency_map_known_answer():
    from microsnoop_ray.evaluate import consistency_map

    # two perturbations, two replicates each, perfectly separated -> every AP is 1
    df = pd.DataFrame({"Metadata_Compound": ["A", "A", "B", "B"], "f0": [1.0, 0.9, 0.0, 0.1],
                       "f1": [0.0, 0.1, 1.0, 0.9]})
    r = consistency_map(df, "Metadata_Compound", null_size=1000)
    assert r["mean_map"] == 1.0 and r["n_groups"] == 2
    # interleaved: A at 0 and 90 degrees, B at 10 and 80
    x, y = _angle_rows([0, 90, 10, 80])
    df = pd.DataFrame({"Metadata_Compound": ["A", "A", "B", "B"], "f0": x, "f1": y})
    # a(0): b(10) b(80) a(90) -> AP 1/3, a(90) likewise; b(10): a(0) b(80) a(90) -> AP 1/2, b(80) likewise
    per = {g["Metadata_Compound"]: g["mean_average_precision"]
           for g in consistency_map(df, "Metadata_Compound", null_size=1000)["per_group"]}
    assert abs(per["A"] - 1 / 3) < 1e-12 and abs(per["B"] - 1 / 2) < 1e-12


# --- baselines and suites --------------------------------------------------------------------

def test_cp_measure_and_pixels_pca_on_real_cells(mlcp_cells):
    from microsnoop_ray.evaluate.baselines import extract
    from microsnoop_ray.features.cellprofiler import nearest_object_masks

    images, table = mlcp_cells
    masks = nearest_object_masks(images, [1])
    area = masks.reshape(len(masks), -1).sum(1)
    assert (area > 20).all() and (area < 40 * 40).all()  # one real object, not the whole crop
    r = extract("cp_measure", images, ["Brightfield", "DNA", "Darkfield"], mask_channels=[1])
    F = r["features"]
    assert F.shape[0] == len(images) and F.shape[1] > 300 and np.isfinite(F).all()
    assert np.allclose(F.mean(0), 0, atol=1e-4) and r["notes"]["raw_features"] >= F.shape[1]
    p = extract("pixels_pca", images, ["a", "b", "c"])
    assert p["features"].shape == (len(images), len(images) - 1) and p["seconds_per_cell"] > 0
    with pytest.raises(ValueError, match="method must be one of"):
        extract("deepprofiler", images, ["a", "b", "c"])


def test_suite_with_missing_data_is_skipped_not_faked(tmp_path):
    from microsnoop_ray.evaluate.suites import run_suite

    doc = run_suite("mlcp-cellcycle", tmp_path / "nowhere", tmp_path / "out", methods=["pixels_pca"],
                    log=lambda m: None)
    assert doc["status"] == "skipped" and "mlcp_cellcycle/cells.npz" in doc["reason"]
    assert "metrics" not in doc
    assert "skipped" in (tmp_path / "out" / "mlcp-cellcycle" / "table.md").read_text()


@pytest.mark.slow
def test_profile_suites_cli_and_report(tmp_path):
    import json

    from microsnoop_ray.cli import main
    from microsnoop_ray.evaluate.suites import load_bbbc021_well_profiles

    out = tmp_path / "evaluation"
    assert main(["evaluate", "suite", "bbbc021-cp-profiles,lincs-plate", "--data", str(SHARED), "--out", str(out),
                 "--methods", "microsnoop,random_init,cp_measure,pixels_pca", "--null-size", "2000",
                 "--quiet"]) == 0
    doc = json.loads((out / "bbbc021-cp-profiles" / "result.json").read_text())
    nsc = [r for r in doc["metrics"] if r["task"] == "NSC"
           and r["method"] == "cellprofiler_profiles, sphered (global scope, mean-eigenvalue)"]
    assert len(nsc) == 1 and nsc[0]["total"] == 103
    # 330 DMSO wells for 516 features: the default regulariser beats pycytominer's epsilon 1e-6 in both scopes
    value = {r["method"]: r["value"] for r in doc["metrics"] if r["task"] == "NSC"}
    for scope in ("global", "batch"):
        new, old = (value[f"cellprofiler_profiles, sphered ({scope} scope, {r})"] for r in ("mean-eigenvalue",
                                                                                             "epsilon 1e-6"))
        assert new > old + 0.05, (scope, new, old)
    fit = doc["methods"]["cellprofiler_profiles, sphered (global scope, mean-eigenvalue)"]["sphering"][0]
    assert fit["n_controls"] == 330 and fit["rank"] == 329 and fit["condition_number_before"] is None
    table = (out / "bbbc021-cp-profiles" / "table.md").read_text()
    for m in ("microsnoop", "random_init", "cp_measure", "pixels_pca"):
        assert f"| {m} |" in table  # every method has its row, n/a where no images exist
    lincs = json.loads((out / "lincs-plate" / "result.json").read_text())
    assert lincs["status"] == "ok" and 0 < lincs["metrics"][0]["value"] <= 1
    assert lincs["data"]["dmso_wells"] == 24
    # the single-metric command agrees with the suite
    wells = tmp_path / "wells.parquet"
    load_bbbc021_well_profiles(SHARED).to_parquet(wells)
    assert main(["evaluate", "nsc", str(wells), "--sphere", "global", "--json", str(tmp_path / "nsc.json"),
                 "--png", str(tmp_path / "nsc.png")]) == 0
    single = json.loads((tmp_path / "nsc.json").read_text())
    assert single["nsc"]["correct"] == nsc[0]["correct"] and (tmp_path / "nsc.png").stat().st_size > 10_000
    assert main(["evaluate", "knn", str(wells), "--label", "Metadata_nope"]) == 2
    assert main(["report", "--results", str(out)]) == 0
    page = (out / "report.md").read_text()
    assert "## bbbc021-cp-profiles" in page and "not run yet" in page  # mlcp / chx were not run here
    from microsnoop_ray.model.load import load_model
    card = load_model().model_card  # the report shows the model card of the shipped weights
    assert f"| model_id | {card.model_id} |" in page and card.weights_sha256 in page
    assert (out / "report.html").read_text().count("<table>") >= 3


def test_nsc_command_accepts_treatment_profiles_and_leaves_controls_out():
    from microsnoop_ray.evaluate.commands import evaluate_nsc

    t = _treatments([("c1", "X", "W1", 1.0, 0.0), ("c2", "X", "W2", 0.9, 0.1), ("c3", "Y", "W1", 0.0, 1.0),
                     ("c4", "Y", "W2", 0.1, 0.9)]).rename(columns={"Metadata_NSCB_Batch": "Metadata_Batch"})
    t["Metadata_Concentration"] = 1.0
    with_dmso = pd.concat([t, pd.DataFrame({"Metadata_Compound": ["DMSO"], "Metadata_moa": ["DMSO"],
                                            "Metadata_Batch": ["W1"], "Metadata_Concentration": [0.0],
                                            "f0": [0.95], "f1": [0.05]})], ignore_index=True)
    a, _, _ = evaluate_nsc(t)
    b, _, _ = evaluate_nsc(with_dmso)
    assert a["nsc"]["correct"] == b["nsc"]["correct"] == 4 and b["control_rows_left_out"] == 1
    assert a["nscb"]["correct"] == b["nscb"]["correct"] == 4 and a["input"] == "treatment profiles"


def test_mlcp_five_classes_merge_interphase_on_the_real_labels():
    from microsnoop_ray.evaluate.suites import five_class

    m = pd.read_csv(shared("mlcp_cellcycle", "cells.csv"))
    y = m.loc[m["Metadata_Experiment"] == "Experiment_1", "Metadata_Phase"]
    assert y.nunique() == 7
    five = pd.Series(five_class(y.to_numpy())).value_counts()
    assert len(five) == 5 and five["Interphase"] == 2700  # G1, S and G2: 900 each
