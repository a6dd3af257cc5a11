"""CellProfiler measurements beside the embeddings (cp-measure on each cell's own object), on real images."""
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import tifffile

from microsnoop_ray.features.cellprofiler import (MeasureError, cellprofiler_name, cellprofiler_names, measure_crops,
                                                  measure_object, nearest_object_masks, parse_feature_sets)


def _cp_measure_direct(image, mask, channels):
    """cp-measure called directly, as its README shows, on one object: {cp-measure name: value}."""
    from cp_measure.featurizer import featurize, make_featurizer_config

    cfg = make_featurizer_config(list(channels), objects=["Cells"], correlation_costes_params={"scale_max": 65535})
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        data, cols, _ = featurize(image[None].astype(np.float64) / 65535, mask[None, None].astype(np.int32), cfg)
    return dict(zip(cols, data[0]))


def assert_finite_where_defined(values: pd.DataFrame) -> None:
    """Measured cells have finite intensity, size and granularity values (what is always defined for an
    object with pixels), and most of all their columns are finite."""
    always = [c for c in values if "_Intensity_" in c or c.endswith("_AreaShape_Area") or "_Granularity_" in c]
    assert len(values) and always and np.isfinite(values[always].to_numpy(np.float64)).all()
    assert np.isfinite(values.to_numpy(np.float64)).mean() > 0.8


def _assert_same(ours: pd.Series, direct: dict):
    checked, seen = 0, set()
    for key, value in direct.items():
        name = cellprofiler_name(key)
        if name is None or name in seen:  # positions; a pair's other order (CellProfiler measures a pair once)
            continue
        seen.add(name)
        if np.isfinite(value):
            assert ours[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
            checked += 1
        else:
            assert np.isnan(ours[name]), name
    assert checked > 200  # (one channel: ~260 columns; three: ~600)


def test_names_follow_cellprofiler_and_pycytominer_infers_them():
    from pycytominer.cyto_utils import infer_cp_features

    names = cellprofiler_names(["DNA", "ER"])
    for n in ("Cells_AreaShape_Area", "Cells_Intensity_MeanIntensity_DNA", "Cells_Texture_Contrast_ER_3_00_256",
              "Cells_Granularity_1_DNA", "Cells_RadialDistribution_FracAtD_ER_1of4",
              "Cells_Correlation_Correlation_DNA_ER", "Cells_Correlation_Manders_ER_DNA",
              "Cells_Correlation_Costes_DNA_ER"):
        assert n in names, n
    assert len(names) == len(set(names))
    assert not [n for n in names if "Center_" in n or "BoundingBoxMinimum" in n or "Location" in n]
    df = pd.DataFrame(np.zeros((2, len(names))), columns=names).assign(Metadata_Plate="P")
    assert infer_cp_features(df) == names
    assert parse_feature_sets("cellprofiler, microsnoop") == ("microsnoop", "cellprofiler")
    with pytest.raises(ValueError, match="comma list"):
        parse_feature_sets("deepprofiler")


def test_fields_writes_cellprofiler_columns_equal_to_cp_measure_on_each_cells_own_object(tmp_path, published_ckpt,
                                                                                           stardist_nuclei):
    img, mask = stardist_nuclei
    img, mask = img[:256, :256], mask[:256, :256]
    tifffile.imwrite(tmp_path / "f.tif", img)
    tifffile.imwrite(tmp_path / "f_masks.tif", mask.astype(np.uint16))
    out = {}
    for feats in ("microsnoop", "microsnoop,cellprofiler"):
        out[feats] = tmp_path / feats.replace(",", "_")
        r = subprocess.run([sys.executable, "-m", "microsnoop_ray.cli", "fields", tmp_path / "f.tif", "--masks",
                            tmp_path / "f_masks.tif", "--weights", published_ckpt, "--out", out[feats],
                            "--channel-names", "DNA", "--features", feats, "--max-cells-per-site", "6"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
    plain = pd.read_parquet(out["microsnoop"] / "cells.parquet")
    both = pd.read_parquet(out["microsnoop,cellprofiler"] / "cells.parquet")
    emb = [c for c in plain.columns if c.startswith("Microsnoop_")]
    np.testing.assert_array_equal(both[emb].to_numpy(), plain[emb].to_numpy())  # the embedding is untouched
    cp_cols = [c for c in both.columns if c.startswith("Cells_")]
    assert cp_cols == cellprofiler_names(["DNA"])
    assert (both["Cells_AreaShape_Area"] == both["Metadata_Object_Area"]).all()
    assert_finite_where_defined(both[cp_cols])
    for _, cell in both.iterrows():  # each cell measured on its own label, inside its crop window
        t, b, l, r = (int(cell[f"Metadata_Crop_{k}"]) for k in ("Top", "Bottom", "Left", "Right"))
        direct = _cp_measure_direct(img[None, t:b, l:r], mask[t:b, l:r] == cell["Metadata_ObjectNumber"], ["DNA"])
        _assert_same(cell[cp_cols], direct)
    fields = pd.read_parquet(out["microsnoop,cellprofiler"] / "fields.parquet")
    assert "Cells_Intensity_MeanIntensity_DNA" in fields


def test_embed_measures_pre_cropped_cells_and_reports_what_it_cannot_measure(tmp_path, published_ckpt, mlcp_cells):
    images, _ = mlcp_cells
    images = images[:6]
    np.save(tmp_path / "cells.npy", images)
    masks = nearest_object_masks(images)
    masks[2] = 0  # a cell whose given mask is empty: it cannot be measured
    np.save(tmp_path / "masks.npy", masks)
    names = ["Brightfield", "DNA", "Darkfield"]
    r = subprocess.run([sys.executable, "-m", "microsnoop_ray.cli", "embed", tmp_path / "cells.npy", "--out",
                        tmp_path / "e.parquet", "--weights", published_ckpt, "--channel-names", ",".join(names),
                        "--features", "microsnoop,cellprofiler", "--masks", tmp_path / "masks.npy"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 3, r.stderr  # some input was not fully profiled
    assert "some images have no CellProfiler measurements: 1 of 6" in r.stderr
    df = pd.read_parquet(tmp_path / "e.parquet")
    cp_cols = cellprofiler_names(names)
    assert len(df) == 6 and len([c for c in df if c.startswith("Microsnoop_")]) == 768
    assert [c for c in df if c.startswith("Cells_")] == cp_cols
    assert df.loc[2, cp_cols].isna().all() and "no pixels" in df.loc[2, "Metadata_Dropped_Reason"]
    assert df["Metadata_Dropped_Reason"].drop(index=2).isna().all()
    assert_finite_where_defined(df.loc[df["Metadata_Dropped_Reason"].isna(), cp_cols])
    for i in (0, 5):
        _assert_same(df.loc[i, cp_cols].astype(np.float64), _cp_measure_direct(images[i], masks[i], names))


def test_constant_and_empty_planes_are_measured_not_crashed(mlcp_cells):
    images, _ = mlcp_cells
    cell = images[0].copy()
    cell[2] = 700  # a constant channel
    mask = nearest_object_masks(cell[None], [1])[0]
    names = ["Brightfield", "DNA", "Darkfield"]
    values = pd.Series(measure_object(cell, mask, names), index=cellprofiler_names(names))
    assert values["Cells_Intensity_MeanIntensity_Darkfield"] == pytest.approx(700 / 65535)
    assert values["Cells_Intensity_StdIntensity_Darkfield"] == pytest.approx(0, abs=1e-12)
    corr = values["Cells_Correlation_Correlation_DNA_Darkfield"]  # no correlation with a constant plane
    assert np.isnan(corr) or abs(corr) < 1e-9
    assert not np.isinf(values.to_numpy()).any()
    _assert_same(values, _cp_measure_direct(cell, mask, names))  # what CellProfiler's measures give it
    assert np.isfinite(values["Cells_AreaShape_Area"]) and values["Cells_AreaShape_Area"] == mask.sum()
    empty = np.zeros((1, 3, 40, 40), np.uint16)
    v, failed = measure_crops(empty, names)
    assert not failed and v[0, cellprofiler_names(names).index("Cells_AreaShape_Area")] == 1600
    with pytest.raises(MeasureError, match="no pixels"):
        measure_object(cell, np.zeros_like(mask), names)


def test_a_cell_that_cannot_be_measured_is_dropped_with_its_reason_and_the_site_completes(mlcp_cells):
    """The crop stage's accounting: a failed measurement becomes a DROP row; the site still completes."""
    from microsnoop_ray.io.sources import CellChunk
    from microsnoop_ray.pipeline.stages import DROP, SiteCollector, _Site, concat_rows

    images, _ = mlcp_cells
    cells = images[:4]
    masks = nearest_object_masks(cells)
    masks[1] = 0
    names = ["Brightfield", "DNA", "Darkfield"]
    values, failed = measure_crops(cells, names, masks)  # the real failure of cell index 1
    item = CellChunk("P", "A01", 1, 3, path="cells.npy", rows=(0, 1, 2, 3), object_numbers=(1, 2, 3, 4),
                     site_planes=12)
    objects = pd.DataFrame({"Metadata_ObjectNumber": [1, 2, 3, 4]})
    rows = _Site(item, objects, cells, 0, cells.dtype, "Cells").rows(values, {int(i) + 1: why
                                                                              for i, why in failed.items()})
    assert (rows["kind"] == DROP).sum() == 1 and "no pixels" in rows["reason"][rows["kind"] == DROP][0]
    written = {}
    rows["features"] = np.zeros((len(rows["kind"]), 256), np.float32)
    collector = SiteCollector(lambda k, c, d, r, a: written.update(cells=c, dropped=d), lambda k, r: None,
                              {"P": names}, features=("microsnoop", "cellprofiler"))
    collector.add(concat_rows([rows]))
    assert collector.sites_done == 1 and not collector.incomplete()
    assert written["cells"]["Metadata_ObjectNumber"].tolist() == [1, 3, 4]
    assert [d["Metadata_ObjectNumber"] for d in written["dropped"]] == [2]
    np.testing.assert_allclose(written["cells"][cellprofiler_names(names)].to_numpy(), values[[0, 2, 3]])


def test_float_crops_of_raw_intensities_are_measured_on_one_stated_scale(tmp_path, published_ckpt, mlcp_cells):
    """Floats outside [-1, 1] (raw 0-237 intensities, as a notebook hands them over) are read as the
    8-bit depth that holds them: finite values, equal to the same cells given as uint8."""
    images, _ = mlcp_cells
    cells = images[:8].astype(np.float64)
    lo, hi = cells.min(axis=(0, 2, 3), keepdims=True), cells.max(axis=(0, 2, 3), keepdims=True)
    as8 = np.round((cells - lo) / (hi - lo) * 237).astype(np.uint8)
    np.save(tmp_path / "cells.npy", as8.astype(np.float32))
    names = ["Brightfield", "DNA", "Darkfield"]
    r = subprocess.run([sys.executable, "-m", "microsnoop_ray.cli", "embed", tmp_path / "cells.npy", "--out",
                        tmp_path / "e.parquet", "--weights", published_ckpt, "--channel-names", ",".join(names),
                        "--features", "cellprofiler"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(tmp_path / "e.parquet")
    cp_cols = cellprofiler_names(names)
    assert_finite_where_defined(df[cp_cols])
    ints, failed = measure_crops(as8, names)
    assert not failed
    np.testing.assert_allclose(df[cp_cols].to_numpy(np.float64), ints, rtol=1e-6, atol=1e-9, equal_nan=True)
    import json

    summary = json.loads((tmp_path / "e.summary.json").read_text())
    assert summary["cellprofiler"]["pixel_scale"] == {"dtype": "float32", "divided_by": 255.0}
    assert summary["cellprofiler"]["measured"] == 8


def test_a_run_where_no_cell_can_be_measured_says_so_and_exits_3(tmp_path, published_ckpt, mlcp_cells):
    images, _ = mlcp_cells
    np.save(tmp_path / "cells.npy", images[:5].astype(np.float32) * 3.0)
    np.save(tmp_path / "masks.npy", np.zeros((5, 40, 40), np.int32))
    r = subprocess.run([sys.executable, "-m", "microsnoop_ray.cli", "embed", tmp_path / "cells.npy", "--out",
                        tmp_path / "e.parquet", "--weights", published_ckpt, "--features", "cellprofiler",
                        "--masks", tmp_path / "masks.npy", "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 3, r.stderr
    assert "WARNING: most images have no CellProfiler measurements: 5 of 5" in r.stderr
    assert "5 x CellProfiler measurements: its object has no pixels in the window" in r.stderr
    import json

    cp = json.loads((tmp_path / "e.summary.json").read_text())["cellprofiler"]
    assert cp["measured"] == 0 and cp["not_measured_by_reason"] == {
        "CellProfiler measurements: its object has no pixels in the window": 5}
