"""The Ray Data plate pipeline on real images (one 2-CPU Ray runtime for the session)."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import shared
from microsnoop_ray.encode.embed import embed
from microsnoop_ray.io.zarr_plate import open_plate
from microsnoop_ray.pipeline.plate_job import ProfileConfig, run_profile

# The Ray pipeline end to end on real plates: each test runs `profile` at least once.
pytestmark = pytest.mark.slow


def _digest(root):
    files = sorted(p for p in root.rglob("*.parquet")) + [root / "skipped.csv"]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def profiled(ray_session, transfluor_plate, untrained_weights, tmp_path_factory):
    plate, platemap = transfluor_plate
    out = tmp_path_factory.mktemp("profile-out")
    cfg = ProfileConfig.from_mapping({"inputs": [str(plate)], "out": str(out), "platemap": str(platemap),
                                      "weights": str(untrained_weights), "segmenter": "classical",
                                      "max_cells_per_site": 3, "batch": "2026_demo", "progress": False,
                                      "batch_size": 16})
    summary = run_profile(cfg, progress_print=lambda *a: None)
    return cfg, summary, out


def test_two_cpus_do_not_deadlock_and_every_site_is_accounted_for(ray_session, profiled):
    cfg, summary, out = profiled
    assert ray_session.cluster_resources()["CPU"] == 2
    sites = list(out.glob("embeddings/*/2026_demo/Transfluor/*"))
    assert len(sites) == 24  # 8 wells x 3 fields: each has its cells or the reason it has none
    written = [s for s in sites if (s / "embeddings.parquet").exists()]
    skipped = [s for s in sites if (s / "skipped.json").exists()]
    assert len(written) + len(skipped) == 24 and not set(written) & set(skipped)
    listed = pd.read_csv(out / "skipped.csv")
    assert len(listed) == len(skipped)
    assert summary["plates"]["Transfluor"]["sites"] == len(written)


def test_one_row_per_well_with_metadata_and_object_counts(profiled):
    cfg, summary, out = profiled
    wells = pd.read_parquet(next(out.glob("profiles/*/2026_demo/Transfluor/Transfluor.parquet")))
    assert wells["Metadata_Well"].is_unique
    for col in ("Metadata_Batch", "Metadata_Plate", "Metadata_Well", "Metadata_Row", "Metadata_Column",
                "Metadata_Object_Count", "Metadata_pert_type", "Metadata_Compound", "Metadata_Concentration"):
        assert col in wells, col
    assert set(wells["Metadata_Batch"]) == {"2026_demo"}
    feats = [c for c in wells if not c.startswith("Metadata_")]
    assert feats[0] == "Microsnoop_GFP_000" and len(feats) == 256
    for r in wells.itertuples():
        n = sum(len(pd.read_parquet(f)) for f in out.glob(f"embeddings/*/2026_demo/Transfluor/{r.Metadata_Well}-*/"
                                                          "embeddings.parquet"))
        assert r.Metadata_Object_Count == n
    assert wells.groupby("Metadata_pert_type").size().to_dict() == {"negcon": 3, "trt": 5} or \
        len(wells) < 8  # a well whose fields all had no cells would be absent and listed in skipped.csv


def test_pipeline_embeddings_equal_the_bare_encoder(profiled, transfluor_plate, untrained_weights):
    cfg, summary, out = profiled
    f = sorted(out.glob("embeddings/*/2026_demo/Transfluor/*/embeddings.parquet"))[0]
    cells = pd.read_parquet(f)
    well, site = cells["Metadata_Well"].iloc[0], int(cells["Metadata_Site"].iloc[0])
    plate = open_plate(transfluor_plate[0])
    ref = next(r for r in plate.fields() if (r.well, r.site) == (well, site))
    image = plate.read(ref)
    crops = [image[:, r.Metadata_Crop_Top:r.Metadata_Crop_Bottom, r.Metadata_Crop_Left:r.Metadata_Crop_Right]
             for r in cells.itertuples()]
    expect = embed(crops, model=str(untrained_weights), input_size=224)  # field crops keep the 224 input
    feats = cells[[c for c in cells if c.startswith("Microsnoop_")]].to_numpy()
    np.testing.assert_allclose(feats, expect, atol=1e-5)
    assert cells["Metadata_ObjectNumber"].is_unique


def test_sphered_controls_and_treatments(profiled):
    cfg, summary, out = profiled
    fits = summary["sphering"]["fits"]
    assert fits[0]["scope"] == "plate" and fits[0]["group"] == "Transfluor" and fits[0]["method"] == "zca-cor"
    treat = pd.read_parquet(next(out.glob("profiles/*/treatments.parquet")))
    assert "DMSO" not in set(treat["Metadata_Compound"])
    from microsnoop_ray.io.write import read_provenance
    prov = read_provenance(next(out.glob("profiles/*/treatments.parquet")))
    assert prov["sphering"]["scope_requested"] == "plate" and "mean" in prov["aggregation"]
    # diagnostics of each fit: a few control wells for 256 x channels features is the common case, and is said
    f = fits[0]
    assert f["regularization"] == "mean-eigenvalue" and f["epsilon"] == pytest.approx(1.0)
    assert f["n_features"] > f["n_controls"] and f["rank"] < f["n_controls"] and f["fewer_controls_than_features"]
    assert f["condition_number_before"] is None and f["condition_number_after"] < 1e6
    assert f"{f['n_controls']} controls for {f['n_features']} varying features" in f["warning"]
    well_prov = read_provenance(next(out.glob("profiles/*/*/Transfluor/Transfluor_sphered.parquet")))
    assert well_prov["sphering"][0]["effective_rank"] == pytest.approx(f["effective_rank"])
    from microsnoop_ray.pipeline.run_report import sphering_lines
    table = "\n".join(sphering_lines(summary["sphering"]))
    assert f"| plate | Transfluor | {f['n_controls']} | {f['n_features']} | {f['rank']} |" in table
    assert "singular" in table and "Warnings:" in table


def test_rerun_changes_nothing_and_resume_after_loss_is_identical(profiled):
    cfg, summary, out = profiled
    before = _digest(out)
    again = run_profile(cfg, progress_print=lambda *a: None)
    assert again["this_run"] == {"sites_written": 0, "sites_skipped": 0}
    assert _digest(out) == before
    # an interrupted run: some sites never written (and a whole well lost)
    lost = sorted(out.glob("embeddings/*/2026_demo/Transfluor/*/embeddings.parquet"))[:4]
    for f in lost:
        f.unlink()
    for d in out.glob("embeddings/*/2026_demo/Transfluor/O08-*"):
        shutil.rmtree(d)
    resumed = run_profile(cfg, progress_print=lambda *a: None)
    assert resumed["this_run"]["sites_written"] >= 4
    assert _digest(out) == before


def test_the_driver_writing_the_sites_gives_the_same_tables(profiled, tmp_path):
    """run.site_writes: driver (every plane's features come back and the driver writes) against the
    default, where the encoder actors write the sites they finish: the same cells, wells and skips."""
    cfg, summary, out = profiled
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    for d in list(copy.glob("embeddings/*/2026_demo/Transfluor/*"))[::2]:
        shutil.rmtree(d)
    resumed = run_profile(cfg.replace(out=str(copy), run__site_writes="driver"), progress_print=lambda *a: None)
    assert resumed["this_run"]["sites_written"] + resumed["this_run"]["sites_skipped"] == 12
    files = sorted(p.relative_to(out) for p in out.rglob("*.parquet"))
    assert files == sorted(p.relative_to(copy) for p in copy.rglob("*.parquet"))
    for f in files:
        pd.testing.assert_frame_equal(pd.read_parquet(copy / f), pd.read_parquet(out / f))
    assert pd.read_csv(copy / "skipped.csv").equals(pd.read_csv(out / "skipped.csv"))


def test_cell_arrays_with_plate_metadata(ray_session, untrained_weights, tmp_path):
    """Pre-cropped BBBC021 cells: per-plate sphering fitted on the DMSO cells of each plate."""
    data = np.load(shared("bbbc021_chx", "cells.npz"))["images"]
    meta = pd.read_csv(shared("bbbc021_chx", "cells.csv"))
    pick = meta[meta["Metadata_Plate"].isin(["Week4_27801", "Week4_27861"])]
    pick = pick.groupby(["Metadata_Plate", "Metadata_Well"], group_keys=False).head(6)
    images = data[pick.index.to_numpy()].astype(np.float32)
    images[5, 1, 3, 3] = np.nan  # one broken cell: left out and listed, its site still completes
    np.savez(tmp_path / "cells.npz", images=images)
    pick.to_csv(tmp_path / "cells.csv", index=False)
    cfg = ProfileConfig.from_mapping({
        "inputs": [str(tmp_path / "cells.npz")], "out": str(tmp_path / "out"), "weights": str(untrained_weights),
        "channel_names": ["DNA", "Tubulin", "Actin"], "progress": False, "cells_chunk": 2,
        "sphering": {"scope": "plate", "fit_on": "cells", "regularization": "epsilon", "epsilon": 1e-3},
        "recipe": "sphere"})  # fitted on raw control cells: sphering is the recipe's only step
    # the plate map comes from the cell table itself (compound, concentration, pert_type columns)
    pm = pick[["Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Concentration",
               "Metadata_pert_type"]].drop_duplicates()
    pm.to_csv(tmp_path / "map.csv", index=False)
    cfg = cfg.replace(platemap=str(tmp_path / "map.csv"))
    summary = run_profile(cfg, progress_print=lambda *a: None)
    assert summary["skipped"] == 1
    run = summary["this_run"]
    assert run["encoder_actors"] == 2  # pre-cropped cells on 2 CPUs: a one-thread encoder per core
    assert 0 < run["first_result_s"] < run["pipeline_seconds"]
    left_out = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert left_out["kind"].tolist() == ["cell left out"] and "NaN" in left_out["reason"][0]
    assert sum(p["cells"] for p in summary["plates"].values()) == len(pick) - 1
    assert len(summary["sphering"]["fits"]) == 2  # one per plate, fitted on its DMSO cells (one was left out)
    assert sum(f["n_controls"] for f in summary["sphering"]["fits"]) == 11
    wells = pd.concat(pd.read_parquet(f) for f in (tmp_path / "out").glob("profiles/*/Week4/*/*_sphered.parquet"))
    assert len(wells) == pm.shape[0] and (wells["Metadata_Batch"] == "Week4").all()
    assert [c for c in wells if c.startswith("Microsnoop_")][256] == "Microsnoop_Tubulin_000"
    cells = pd.concat(pd.read_parquet(f) for f in (tmp_path / "out").glob("embeddings/*/Week4/*/*/*.parquet"))
    keys = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber"]
    assert len(cells) == len(pick) - 1 and not cells.duplicated(keys).any()
    # the two encoder actors compute what one process computes from the same crops
    both = cells.merge(pick[keys].assign(_row=np.arange(len(pick))), on=keys)
    assert len(both) == len(cells)
    np.testing.assert_allclose(both[[c for c in cells if c.startswith("Microsnoop_")]].to_numpy(),
                               embed(images[both["_row"].to_numpy()], model=str(untrained_weights)), atol=1e-5)
    # without negative controls the profiles are still written, unsphered, and the summary says why
    pm[pm["Metadata_pert_type"] != "negcon"].drop(columns="Metadata_pert_type").to_csv(tmp_path / "map2.csv",
                                                                                      index=False)
    cfg = cfg.replace(platemap=str(tmp_path / "map2.csv"))
    again = run_profile(cfg, progress_print=lambda *a: None)
    assert again["sphering"] == {"applied": False, "reason": "no Metadata_pert_type column in the plate map"}
    assert again["this_run"]["sites_written"] == 0 and again["skipped"] == 1
    notes = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert set(notes["kind"]) == {"plate map", "cell left out"}
    assert set(notes.loc[notes["kind"] == "plate map", "Metadata_Well"]) == {"B02"}
    assert again["plate_map_problems"] == 2  # the DMSO well of each plate is not in this map


def test_profile_command_with_a_config_file_reruns_to_the_same_output(profiled, tmp_path):
    import yaml

    from microsnoop_ray.cli import main

    cfg, summary, out = profiled
    before = _digest(out)
    d = cfg.to_dict()  # nested sections in the file, as run_config.yaml writes them
    options = {**{k: d[k] for k in ("inputs", "out", "platemap", "batch")},
               "segmentation": {"segmenter": d["segmentation"]["segmenter"]},
               "crop": {"max_cells_per_site": d["crop"]["max_cells_per_site"]},
               "encode": {"weights": d["encode"]["weights"], "batch_size": d["encode"]["batch_size"]}}
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(options))
    code = main(["profile", "--config", str(tmp_path / "profile.yaml"), "-q"])
    assert code == (3 if summary["skipped"] else 0)
    assert _digest(out) == before
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["crop"]["max_cells_per_site"] == 3 and saved["batch"] == "2026_demo" and saved["model_id"].startswith(
        "microsnoop-UNTRAINED-")
    assert json.loads((out / "summary.json").read_text())["this_run"] == {"sites_written": 0, "sites_skipped": 0}


def test_bad_fields_are_skipped_with_reasons_and_the_rest_goes_on(ray_session, untrained_weights, tmp_path):
    import tifffile

    from conftest import transfluor_images
    from microsnoop_ray.io.zarr_plate import write_plate

    real = tifffile.imread(transfluor_images() / "AS_09047_050428030001_O01f00d2.TIF")[None]
    nan = real.astype(np.float32)
    nan[0, 10:20, 10:20] = np.nan
    fields = {("A01", 1): real, ("A02", 1): nan, ("A03", 1): np.zeros_like(real), ("A04", 1): real.copy(),
              ("A05", 1): real[:, :256, :300].copy(), ("A06", 1): real > 100}
    plate = write_plate(tmp_path / "Bad.zarr", fields, ["GFP"], version="0.5")
    for chunk in (plate / "A" / "4" / "0" / "0" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"not a chunk")
    cfg = ProfileConfig.from_mapping({"inputs": [str(plate)], "out": str(tmp_path / "out"), "segmenter": "classical",
                                      "weights": str(untrained_weights), "max_cells_per_site": 2, "progress": False})
    summary = run_profile(cfg, progress_print=lambda *a: None)
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv").set_index("Metadata_Well")["reason"]
    assert sorted(skipped.index) == ["A02", "A03", "A04", "A06"]
    assert "NaN" in skipped["A02"] and "constant" in skipped["A03"]
    assert "pixel data unreadable" in skipped["A04"] and "not numeric" in skipped["A06"]
    assert all(f"well {w}, site 1" in skipped[w] for w in skipped.index)
    assert summary["plates"]["Bad"]["wells"] == 2 and summary["skipped"] == 4


def test_load_data_csv_image_table_through_the_pipeline(ray_session, untrained_weights, tmp_path):
    from conftest import transfluor_images

    files = sorted(transfluor_images().glob("AS_*_O0[12]f0[01]d2.TIF"))
    ld = pd.DataFrame({"Metadata_Plate": "TF", "Metadata_Well": [f.name.split("_")[-1][:3] for f in files],
                       "Metadata_Site": [int(f.name.split("f")[-1][:2]) + 1 for f in files],
                       "FileName_GFP": [f.name for f in files], "PathName_GFP": str(transfluor_images())})
    ld.to_parquet(tmp_path / "load_data.parquet")
    cfg = ProfileConfig.from_mapping({"inputs": [str(tmp_path / "load_data.parquet")], "out": str(tmp_path / "out"),
                                      "segmenter": "classical", "weights": str(untrained_weights),
                                      "max_cells_per_site": 2, "progress": False})
    summary = run_profile(cfg, progress_print=lambda *a: None)
    wells = pd.read_parquet(next((tmp_path / "out").glob("profiles/*/default/TF/TF.parquet")))
    assert wells["Metadata_Well"].tolist() == ["O01", "O02"][:len(wells)] and summary["skipped"] + \
        summary["plates"]["TF"]["sites"] == 4


def test_every_row_carries_its_annotations_model_and_provenance(profiled):
    cfg, summary, out = profiled
    from microsnoop_ray.io.write import SCHEMA_KEY, read_provenance
    import pyarrow.parquet as pq

    f = sorted(out.glob("embeddings/*/2026_demo/Transfluor/*/embeddings.parquet"))[0]
    cells = pd.read_parquet(f)
    model_id = summary["model_id"]
    assert set(cells["Metadata_Model"]) == {model_id}
    well = cells["Metadata_Well"].iloc[0]
    pm = pd.read_csv(cfg.platemap).set_index("well_position")
    assert set(cells["Metadata_pert_type"]) == {pm.loc[well, "pert_type"]}
    assert set(cells["Metadata_Compound"]) == {pm.loc[well, "Compound"]}
    wells = pd.read_parquet(next(out.glob("profiles/*/2026_demo/Transfluor/Transfluor.parquet")))
    treat = pd.read_parquet(next(out.glob("profiles/*/treatments.parquet")))
    assert set(wells["Metadata_Model"]) == set(treat["Metadata_Model"]) == {model_id}
    prov = read_provenance(f)
    assert prov["package"].startswith("microsnoop-ray ") and prov["segmenter_used"].startswith("classical:")
    assert prov["inputs"][0]["path"] == str(Path(cfg.inputs[0]).resolve()) and prov["inputs"][0]["bytes"] > 0
    assert len(prov["platemap"]["sha256"]) == 64 and prov["config"]["crop"]["max_cells_per_site"] == 3
    assert summary["provenance"]["platemap"] == prov["platemap"]
    # footers: only our provenance; no pandas / Arrow schema copies of every column name
    md = pq.read_schema(f).metadata
    assert set(md) == {SCHEMA_KEY}
    assert pq.ParquetFile(f).metadata.serialized_size < 40_000


def test_pycytominer_and_copairs_run_on_the_outputs_with_the_documented_calls(profiled):
    """The README's calls: pycytominer aggregate, annotate, normalize (standardize, spherize ZCA-cor),
    feature_select and consensus, and copairs' average_precision, on the outputs of a real plate."""
    from copairs.map import average_precision
    from pycytominer import aggregate, annotate, consensus, feature_select, normalize

    import microsnoop_ray

    cfg, summary, out = profiled
    cells = pd.concat([pd.read_parquet(f) for f in sorted(out.glob("embeddings/*/*/*/*/embeddings.parquet"))],
                      ignore_index=True)
    features = microsnoop_ray.feature_columns(cells)
    assert len(features) == 256 and all(f.startswith("Microsnoop_") for f in features)
    wells = aggregate(cells, strata=["Metadata_Plate", "Metadata_Well"], features=features, operation="median")
    assert len(wells) == cells["Metadata_Well"].nunique()
    platemap = pd.read_csv(cfg.platemap)
    annotated = annotate(wells, platemap, join_on=["Metadata_well_position", "Metadata_Well"])
    assert annotated["Metadata_pert_type"].notna().all()
    std = normalize(annotated, features=features, samples="Metadata_pert_type == 'negcon'", method="standardize")
    sph = normalize(annotated, features=features, samples="Metadata_pert_type == 'negcon'", method="spherize",
                    spherize_method="ZCA-cor")
    assert np.isfinite(std[features].to_numpy()).all() and np.isfinite(sph[features].to_numpy()).all()
    selected = feature_select(std, features=features, operation=["variance_threshold", "correlation_threshold"])
    kept = microsnoop_ray.feature_columns(selected)
    assert 0 < len(kept) <= len(features)
    cons = consensus(selected, replicate_columns=["Metadata_Compound", "Metadata_Concentration"], features=kept)
    assert len(cons) == platemap[["Compound", "Concentration"]].drop_duplicates().shape[0]
    meta = std[[c for c in std.columns if c.startswith("Metadata_")]].reset_index(drop=True)
    ap = average_precision(meta, std[features].to_numpy(), pos_sameby=["Metadata_Compound"],
                           pos_diffby=[], neg_sameby=[], neg_diffby=["Metadata_Compound"], progress_bar=False)
    assert ap["average_precision"].between(0, 1).all() and len(ap) == len(std)


def test_export_h5ad_and_plate_parquet(profiled, tmp_path):
    """h5ad written through anndata and read back by it (features only in X, metadata in obs with text as
    categoricals and numbers as numbers, provenance in uns), and one single-cell Parquet per plate;
    --pca records how it was fitted."""
    import anndata

    from microsnoop_ray.cli import main

    cfg, summary, out = profiled
    cells = pd.concat([pd.read_parquet(f) for f in sorted(out.glob("embeddings/*/*/*/*/embeddings.parquet"))],
                      ignore_index=True)
    assert main(["export", str(out), "--format", "h5ad", "--to", str(tmp_path)]) == 0
    adata = anndata.read_h5ad(tmp_path / "cells.h5ad")
    assert adata.X.dtype == np.float32 and adata.shape == (len(cells), 256)
    np.testing.assert_array_equal(adata.X, cells[[c for c in cells if c.startswith("Microsnoop_")]].to_numpy())
    obs = adata.obs
    assert {"Plate", "Well", "Site", "Model", "pert_type", "Compound", "ObjectNumber"} <= set(obs.columns)
    assert isinstance(obs["Well"].dtype, pd.CategoricalDtype) and isinstance(obs["Compound"].dtype,
                                                                             pd.CategoricalDtype)
    assert pd.api.types.is_integer_dtype(obs["Site"]) and pd.api.types.is_integer_dtype(obs["ObjectNumber"])
    assert list(obs["Well"].astype(str)) == list(cells["Metadata_Well"])
    np.testing.assert_array_equal(obs["ObjectNumber"].to_numpy(), cells["Metadata_ObjectNumber"].to_numpy())
    assert list(adata.var_names[:2]) == ["Microsnoop_GFP_000", "Microsnoop_GFP_001"]
    prov = json.loads(adata.uns["provenance"])
    assert prov["model_card"]["model_id"] == summary["model_id"] and "segmenter_used" in prov
    assert main(["export", str(out), "--format", "plate-parquet", "--to", str(tmp_path)]) == 0
    plate = pd.read_parquet(tmp_path / "Transfluor.parquet")
    assert len(plate) == len(cells) and plate["Metadata_Plate"].eq("Transfluor").all()
    assert main(["export", str(out), "--format", "h5ad", "--level", "wells", "--pca", "2", "--pca-fit", "controls",
                 "--to", str(tmp_path)]) == 0
    wells = anndata.read_h5ad(tmp_path / "wells_pca2.h5ad")
    assert wells.shape[1] == 2 and list(wells.var_names) == ["PC_001", "PC_002"]
    pca = json.loads(wells.uns["pca"])
    assert pca["fit_on"] == "controls" and pca["fit_rows"] == 3
    assert main(["export", str(out), "--format", "h5ad", "--level", "wells", "--pca", "50", "--pca-fit",
                 "controls", "--to", str(tmp_path)]) == 2  # 3 control wells cannot give 50 components


def test_illumination_compute_then_folder(ray_session, transfluor_plate, untrained_weights, tmp_path):
    """--illum compute writes the plate's functions and corrects every field before segmentation and
    cropping; --illum FOLDER reads such files (Cell Painting Gallery names) into the same corrected fields."""
    from microsnoop_ray.io.illum import correct, load_functions
    from microsnoop_ray.io.write import read_provenance
    from microsnoop_ray.pipeline.layout import Layout
    from microsnoop_ray.pipeline.plate_job import list_work, prepare_illumination
    from microsnoop_ray.pipeline.stages import read_row

    plate, platemap = transfluor_plate
    out = tmp_path / "illum-run"
    cfg = ProfileConfig.from_mapping({"inputs": [str(plate)], "out": str(out), "platemap": str(platemap),
                                      "weights": str(untrained_weights), "segmenter": "classical",
                                      "max_cells_per_site": 2, "progress": False, "illum": "compute"})
    summary = run_profile(cfg, progress_print=lambda *a: None)
    func = out / "illum" / "Transfluor" / "Transfluor_IllumGFP.npy"
    assert func.exists() and func.with_suffix(".png").exists()
    assert summary["provenance"]["illumination"]["plates"]["Transfluor"]["fields"] == 24
    f = sorted(out.glob("embeddings/*/*/Transfluor/*/embeddings.parquet"))[0]
    assert read_provenance(f)["illumination"]["mode"] == "compute"
    cells = pd.read_parquet(f)
    well, site = cells["Metadata_Well"].iloc[0], int(cells["Metadata_Site"].iloc[0])
    ref = next(r for r in open_plate(plate).fields() if (r.well, r.site) == (well, site))
    image = correct(open_plate(plate).read(ref), load_functions([func]))
    crops = [image[:, r.Metadata_Crop_Top:r.Metadata_Crop_Bottom, r.Metadata_Crop_Left:r.Metadata_Crop_Right]
             for r in cells.itertuples()]
    feats = cells[[c for c in cells if c.startswith("Microsnoop_")]].to_numpy()
    np.testing.assert_allclose(feats, embed(crops, model=str(untrained_weights), input_size=224), atol=1e-5)  # fields: 224
    # FOLDER: the same files, read by every field's read task
    cfg2 = ProfileConfig.from_mapping({**cfg.to_dict(), "out": str(tmp_path / "other"), "illum": str(out / "illum")})
    items, note = prepare_illumination(cfg2, list_work(cfg2), Layout(cfg2.out, "m"), progress_print=lambda *a: None)
    assert note["mode"] == "folder" and note["plates"]["Transfluor"]["files"] == [str(func)]
    row = read_row({"item": next(i for i in items if (i.well, i.site) == (well, site))})
    np.testing.assert_array_equal(row["image"], image)
    # a folder without this plate's files: the fields are refused with the file named
    (tmp_path / "empty").mkdir()
    cfg3 = ProfileConfig.from_mapping({**cfg2.to_dict(), "illum": str(tmp_path / "empty")})
    items, _ = prepare_illumination(cfg3, list_work(cfg3), Layout(cfg3.out, "m"), progress_print=lambda *a: None)
    error = read_row({"item": items[0]})["error"]
    assert "Transfluor_IllumGFP.npy" in error and error.startswith(f"plate Transfluor, well {items[0].well}")


def test_fields_and_profile_give_the_same_cells_for_the_same_field(profiled, untrained_weights, tmp_path):
    """`fields` runs the same stages in-process: the cells of a plate's field are those `profile` wrote."""
    from conftest import transfluor_images
    from microsnoop_ray.pipeline.fields_job import run_fields

    cfg, summary, out = profiled
    site_file = sorted(out.glob("embeddings/*/2026_demo/Transfluor/*/embeddings.parquet"))[0]
    profile_cells = pd.read_parquet(site_file)
    well, site = profile_cells["Metadata_Well"].iloc[0], int(profile_cells["Metadata_Site"].iloc[0])
    tif = next(transfluor_images().glob(f"AS_*_{well}f{site - 1:02d}d2.TIF"))
    fcfg = ProfileConfig.from_mapping({"inputs": [str(tif)], "out": str(tmp_path / "fields"),
                                       "channel_names": ["GFP"], "segmentation": {"segmenter": "classical"},
                                       "encode": {"weights": str(untrained_weights), "batch_size": 16}})
    result = run_fields(fcfg, progress_print=lambda *a: None)
    assert result["fields"] == 1 and result["skipped"] == 0
    cells = pd.read_parquet(tmp_path / "fields" / "cells.parquet")
    assert cells["Metadata_FileName"].unique().tolist() == [tif.name]
    shared_cols = [c for c in profile_cells.columns if c in cells.columns]
    assert [c for c in profile_cells.columns if c not in shared_cols] == [
        "Metadata_Row", "Metadata_Column", "Metadata_pert_type", "Metadata_Compound", "Metadata_Concentration"]
    mine = cells.set_index("Metadata_ObjectNumber").loc[profile_cells["Metadata_ObjectNumber"]]
    feats = [c for c in profile_cells if c.startswith("Microsnoop_")]
    for col in ("Metadata_Crop_Top", "Metadata_Crop_Left", "Metadata_Location_Center_X"):
        np.testing.assert_array_equal(mine[col].to_numpy(), profile_cells[col].to_numpy())
    np.testing.assert_allclose(mine[feats].to_numpy(), profile_cells[feats].to_numpy(), atol=1e-5)
    skipped = pd.read_csv(tmp_path / "fields" / "skipped.csv")
    assert list(skipped.columns) == list(pd.read_csv(out / "skipped.csv").columns)


def test_profile_writes_cellprofiler_measurements_beside_the_embeddings(profiled, untrained_weights, tmp_path):
    """`--features microsnoop,cellprofiler`: the same embeddings, CellProfiler columns measured on each cell's
    own object (equal to `fields` on the same field), through aggregation, sphering and treatments."""
    from conftest import transfluor_images
    from microsnoop_ray.pipeline.fields_job import run_fields

    cfg, _, plain_out = profiled
    out = tmp_path / "cp"
    summary = run_profile(cfg.replace(out=str(out), features="microsnoop,cellprofiler"), progress_print=lambda *a: None)
    site = sorted(out.glob("embeddings/*/2026_demo/Transfluor/*/embeddings.parquet"))[0]
    cells = pd.read_parquet(site)
    plain = pd.read_parquet(plain_out / site.relative_to(out))
    emb = [c for c in plain if c.startswith("Microsnoop_")]
    np.testing.assert_array_equal(cells[emb].to_numpy(), plain[emb].to_numpy())
    cp_cols = [c for c in cells if c.startswith("Nuclei_")]  # segmented on the nuclei channel: the nucleus
    assert "Nuclei_Intensity_MeanIntensity_GFP" in cp_cols and "Nuclei_AreaShape_Area" in cp_cols
    assert not any(c.startswith(("Cells_", "Cytoplasm_")) for c in cells)
    assert (cells["Nuclei_AreaShape_Area"] == cells["Metadata_Object_Area"]).all()
    well, s = cells["Metadata_Well"].iloc[0], int(cells["Metadata_Site"].iloc[0])
    tif = next(transfluor_images().glob(f"AS_*_{well}f{s - 1:02d}d2.TIF"))
    fcfg = ProfileConfig.from_mapping({"inputs": [str(tif)], "out": str(tmp_path / "fields"), "channel_names": ["GFP"],
                                       "features": "microsnoop,cellprofiler", "segmentation": {"segmenter": "classical"},
                                       "encode": {"weights": str(untrained_weights), "batch_size": 16}})
    run_fields(fcfg, progress_print=lambda *a: None)
    mine = pd.read_parquet(tmp_path / "fields" / "cells.parquet").set_index("Metadata_ObjectNumber")
    np.testing.assert_allclose(mine.loc[cells["Metadata_ObjectNumber"], cp_cols].to_numpy(np.float64),
                               cells[cp_cols].to_numpy(np.float64), rtol=1e-6)
    wells = pd.read_parquet(next(out.glob("profiles/*/2026_demo/Transfluor/Transfluor.parquet")))
    kept = [c for c in cp_cols if c not in summary["nonfinite"]["features_left_out"]]
    assert kept and all(c in wells for c in kept) and np.isfinite(wells[kept].to_numpy()).all()
    assert summary["nonfinite"]["nan_cell_values"] >= 0 and summary["provenance"]["features"] == [
        "microsnoop", "cellprofiler"]
    sphered = pd.read_parquet(next(out.glob("profiles/*/2026_demo/Transfluor/Transfluor_sphered.parquet")))
    selected = [c for c in kept if c in sphered]  # after the recipe's feature selection
    assert selected and np.isfinite(sphered[selected].to_numpy()).all()
    treatments = pd.read_parquet(next(out.glob("profiles/*/treatments.parquet")))
    assert set(selected) <= set(treatments.columns)
