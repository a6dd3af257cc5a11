"""A real Cell Painting plate fragment (LINCS SQ00015198, ../shared/data/lincs_cellpainting): CellProfiler's
load_data.csv as it comes, its illumination columns, its own nucleus centres, nuclei and cells segmented and
matched, three compartments measured as cp-measure measures them, and the run's recipe and evaluation."""
import json

import numpy as np
import pandas as pd
import pytest
from conftest import shared

from microsnoop_ray.errors import InputError
from microsnoop_ray.io.sources import list_sources
from microsnoop_ray.io.tables import read_image_table
from microsnoop_ray.pipeline.config import CropConfig, ProfileConfig, SegmentationConfig
from microsnoop_ray.pipeline.stages import DROP, PLANE, CropStage, read_row

CHANNELS = ["DNA", "RNA", "ER", "AGP", "Mito"]


def lincs(*parts):
    return shared("lincs_cellpainting", *parts)


def test_load_data_channels_are_named_without_orig():
    table, channels = read_image_table(lincs("load_data.csv"))
    assert channels == CHANNELS and "Path_DNA" in table and not any("Orig" in c for c in table.columns)
    work = list_sources([lincs("load_data.csv")], nuclei_channel="DNA", cell_channel="AGP")
    assert work.plates["SQ00015198"].channels == CHANNELS and len(work.items) == 8
    assert {(it.nuclei_channel, it.cell_channel) for it in work.items} == {(0, 3)}
    with pytest.raises(InputError, match="cell channel 'OrigAGP' is not one of the channels"):
        list_sources([lincs("load_data.csv")], nuclei_channel="DNA", cell_channel="OrigAGP")


def test_illumination_columns_of_load_data_are_applied(tmp_path):
    from microsnoop_ray.io.illum import IllumAccumulator, correct

    work = list_sources([lincs("load_data.csv")], nuclei_channel="DNA")
    acc = IllumAccumulator()
    for it in work.items[:4]:
        acc.add(it.load())
    funcs = acc.functions()
    table = pd.read_csv(lincs("load_data.csv"))
    for ch, f in zip(CHANNELS, funcs):
        np.save(tmp_path / f"SQ00015198_Illum{ch}.npy", f)
        table[f"FileName_Illum{ch}"] = f"SQ00015198_Illum{ch}.npy"
        table[f"PathName_Illum{ch}"] = str(tmp_path)
        table[f"PathName_Orig{ch}"] = str(lincs()) + "/" + table[f"PathName_Orig{ch}"]
    table.to_csv(tmp_path / "load_data_with_illum.csv", index=False)
    with_illum = list_sources([tmp_path / "load_data_with_illum.csv"], nuclei_channel="DNA")
    assert with_illum.plates["SQ00015198"].channels == CHANNELS  # the Illum columns are no channels
    item, raw = with_illum.items[5], work.items[5]
    assert item.illum == tuple(str(tmp_path / f"SQ00015198_Illum{ch}.npy") for ch in CHANNELS)
    np.testing.assert_array_equal(item.load(), correct(raw.load(), funcs))
    table.drop(columns=["FileName_IllumER", "PathName_IllumER"]).to_csv(tmp_path / "partial.csv", index=False)
    with pytest.raises(InputError, match="every channel needs its FileName_Illum"):
        list_sources([tmp_path / "partial.csv"])


def test_locations_crop_around_cellprofilers_own_nuclei(tmp_path):
    work = list_sources([lincs("load_data.csv")], nuclei_channel="DNA", locations=lincs("locations"), object_size=30)
    item = work.items[0]
    centres = pd.read_csv(lincs("locations", "SQ00015198", f"{item.well}-{item.site}-Nuclei.csv"))
    rows = CropStage(crop=CropConfig(border="keep")).process(read_row({"item": item}))
    planes = rows["kind"] == PLANE
    assert rows["step_seconds"].shape == (len(rows["kind"]), 6) and rows["step_seconds"][0, 0] > 0  # read time
    objects = pd.DataFrame({k: rows[k][planes][::5] for k in ("Metadata_ObjectNumber", "Metadata_Location_Center_X")})
    assert len(objects) == len(centres) and set(rows["cp_objects"][planes]) == {"Nuclei"}
    np.testing.assert_allclose(objects["Metadata_Location_Center_X"],
                               centres["Nuclei_Location_Center_X"].to_numpy()[objects["Metadata_ObjectNumber"] - 1],
                               atol=1.0)
    gone = list_sources([lincs("load_data.csv")], nuclei_channel="DNA", locations=tmp_path).items[0]
    skip = CropStage().process(read_row({"item": gone}))
    assert skip["kind"].tolist() == ["skip"]
    assert "plate SQ00015198, well A01, site 1" in skip["reason"][0] and "A01-1-Nuclei.csv" in skip["reason"][0]


@pytest.fixture(scope="module")
def cyto_weights(registry_example):
    return registry_example("scellseg-assets") / "pretrained_models" / "cellpose"


@pytest.mark.slow
def test_nuclei_and_cells_of_a_site_counted_matched_and_measured_in_three_compartments(cyto_weights):
    """Cellpose nuclei (DNA) and cells (AGP + DNA) of one real site: the nuclei and the profiled cells
    number 0.8-1.25x CellProfiler's nuclei, every profiled cell holds its nucleus, and the Nuclei, Cells
    and Cytoplasm columns are cp-measure's own values on those objects."""
    from cp_measure.featurizer import featurize

    from microsnoop_ray.features.cellprofiler import _config, cellprofiler_name, cellprofiler_names
    from microsnoop_ray.segment.match import match_cells

    item = list_sources([lincs("load_data.csv")], nuclei_channel="DNA", cell_channel="AGP").items[0]
    seg = SegmentationConfig(segmenter="cellpose", cellpose_model=str(cyto_weights), cell_channel="AGP")
    stage = CropStage(seg, CropConfig(max_cells_per_site=3), features=("microsnoop", "cellprofiler"))
    row = read_row({"item": item})
    nuclei, cells, seconds = stage.segment([item], [row["image"]])[0]
    theirs = len(pd.read_csv(lincs("locations", "SQ00015198", "A01-1-Nuclei.csv")))
    matched = match_cells(nuclei, cells)
    assert 0.8 <= nuclei.max() / theirs <= 1.25 and 0.8 <= len(matched.cell_of) / theirs <= 1.25
    assert seconds["nuclei_segmentation"] > 0 and seconds["cell_segmentation"] > 0
    for nuc in list(matched.cell_of)[:20]:  # a matched cell covers most of its nucleus
        assert ((matched.cells == nuc) & (nuclei == nuc)).sum() >= 0.5 * (nuclei == nuc).sum()
    rows = stage.process(row, (nuclei, cells, seconds))
    assert set(rows["cp_objects"][rows["kind"] == PLANE]) == {"Nuclei,Cells,Cytoplasm"}
    assert any("cell(s) without a nucleus" in r for r in rows["reason"][rows["kind"] == DROP]) == \
        (matched.cells_without_nucleus > 0)
    first = np.flatnonzero((rows["kind"] == PLANE) & (rows["channel"] == 0))[0]
    obj = int(rows["Metadata_ObjectNumber"][first])
    ours = pd.Series(np.frombuffer(rows["cp"][first], np.float64), index=cellprofiler_names(CHANNELS,
                                                                                            ("Nuclei", "Cells", "Cytoplasm")))
    image = row["image"]
    ys, xs = np.nonzero((matched.cells == obj) | (nuclei == obj))
    win = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    nucleus, cell = nuclei[win] == obj, matched.cells[win] == obj
    pixels = image[(slice(None),) + win].astype(np.float64) / 255.0
    for name, mask in (("Nuclei", nucleus), ("Cells", cell), ("Cytoplasm", cell & ~nucleus)):
        data, cols, _ = featurize(pixels[None], mask[None, None].astype(np.int32), _config(tuple(CHANNELS), 255))
        direct = {cellprofiler_name(k, name): v for k, v in zip(cols, data[0])}
        for col in (f"{name}_AreaShape_Area", f"{name}_Intensity_MeanIntensity_Mito",
                    f"{name}_Texture_Contrast_ER_3_00_256", f"{name}_Granularity_2_AGP", f"{name}_Correlation_Correlation_DNA_RNA"):
            assert ours[col] == pytest.approx(direct[col], rel=1e-9, nan_ok=True), col
    assert ours["Cytoplasm_AreaShape_Area"] == ours["Cells_AreaShape_Area"] - (cell & nucleus).sum()


@pytest.mark.slow
def test_profile_runs_load_data_unchanged_with_recipe_and_evaluation(ray_session, untrained_weights, tmp_path):
    from microsnoop_ray.pipeline.plate_job import run_profile

    cfg = ProfileConfig.from_mapping({
        "inputs": [str(lincs("load_data.csv"))], "out": str(tmp_path / "out"), "platemap": str(lincs("platemap.csv")),
        "weights": str(untrained_weights), "nuclei_channel": "DNA", "locations": str(lincs("locations")),
        "features": "microsnoop,cellprofiler", "max_cells_per_site": 4, "progress": False})
    summary = run_profile(cfg, progress_print=lambda *a: None)
    assert summary["plates"]["SQ00015198"]["sites"] == 8 and summary["skipped"] == 0
    well = pd.read_parquet(next((tmp_path / "out").glob("profiles/*/*/SQ00015198/SQ00015198.parquet")))
    assert "Nuclei_Intensity_MeanIntensity_DNA" in well and "Microsnoop_Mito_255" in well
    assert not any(c.startswith("Cells_") or "Orig" in c for c in well.columns)
    written = {o["level"] for o in summary["outputs"]}
    assert {"well (normalized)", "well (feature selected)", "well (sphered)"} <= written
    assert [s["step"] for s in summary["recipe"]] == ["normalize", "feature_select", "sphere"]
    ev = summary["evaluation"]
    assert ev["applied"] and ev["replicates"] == "site" and set(ev["feature_sets"]) == {"microsnoop", "cellprofiler",
                                                                                       "both"}
    for res in ev["feature_sets"].values():
        per = res["activity"]["per_treatment"]
        assert {p["Metadata_Compound"] for p in per} == {"BRD-K55966568", "BRD-K41599323"}
        assert all(0 <= p["mAP"] <= 1 and 0 < p["corrected_p"] <= 1 for p in per)
    steps = summary["this_run"]["step_seconds"]
    assert steps["sites"] == 8 and steps["per_site"]["read"] > 0 and steps["per_site"]["cellprofiler"] > 0
    assert steps["per_site"]["encoder"] > 0 and steps["per_site"]["nuclei_segmentation"] == 0  # centres given
    assert json.loads(next((tmp_path / "out").rglob("summary.json")).read_text())["evaluation"]["replicates"] == "site"
