"""OME-Zarr plates (ours and ome-zarr-py's), image tables, plate maps, conversion."""
import numpy as np
import pandas as pd
import pytest
import zarr

from microsnoop_ray.errors import InputError
from microsnoop_ray.io.tables import join_platemap, read_image_table, read_platemap
from microsnoop_ray.io.zarr_plate import open_plate, write_plate


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_plate_roundtrip_keeps_pixels_channels_and_sizes(tmp_path, version):
    rng = np.random.default_rng(0)
    fields = {("A01", 1): rng.integers(0, 4000, (2, 30, 40), dtype=np.uint16),
              ("A01", 2): rng.integers(0, 4000, (2, 50, 20), dtype=np.uint16),
              ("C12", 1): rng.integers(0, 4000, (2, 30, 40), dtype=np.uint16)}
    p = write_plate(tmp_path / "P7.zarr", fields, ["DNA", "RNA"], version=version)
    plate = open_plate(p)
    assert plate.version == version and plate.name == "P7"
    refs = list(plate.fields())
    assert [(r.well, r.site) for r in refs] == [("A01", 1), ("A01", 2), ("C12", 1)]
    assert plate.channel_names() == ["DNA", "RNA"]
    for r in refs:
        np.testing.assert_array_equal(plate.read(r), fields[(r.well, r.site)])
    assert (p / (".zattrs" if version == "0.4" else "zarr.json")).exists()


@pytest.mark.parametrize("fmt_name", ["FormatV04", "FormatV05"])
def test_reads_plates_written_by_ome_zarr_py(tmp_path, fmt_name):
    """An independent writer: pyramids (s0..), tczyx axes, omero labels at the image level."""
    from ome_zarr import format as ozf
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    fmt = getattr(ozf, fmt_name)()
    root = zarr.open_group(str(tmp_path / "hidden.zarr"), mode="w", zarr_format=2 if fmt.version == "0.4" else 3)
    write_plate_metadata(root, ["A", "B"], ["1", "2", "3"], ["A/1", "B/3"], fmt=fmt, name="hidden")
    data = {}
    for wp in ["A/1", "B/3"]:
        r, c = wp.split("/")
        wg = root.require_group(r).require_group(c)
        write_well_metadata(wg, [{"path": "0"}], fmt=fmt)
        img = np.random.default_rng(len(data)).integers(0, 1000, (1, 3, 2, 64, 64)).astype(np.uint16)
        ig = wg.require_group("0")
        write_image(img, ig, axes="tczyx", fmt=fmt, storage_options={"chunks": (1, 1, 1, 32, 32)})
        attrs = dict(ig.attrs)
        omero = {"channels": [{"label": n} for n in ("DNA", "ER", "Mito")]}
        if "ome" in attrs:
            ig.attrs["ome"] = {**attrs["ome"], "omero": omero}
        else:
            ig.attrs["omero"] = omero
        data[wp] = img
    plate = open_plate(tmp_path / "hidden.zarr")
    refs = list(plate.fields())
    assert [r.well for r in refs] == ["A01", "B03"] and plate.name == "hidden"
    assert plate.channel_names() == ["DNA", "ER", "Mito"]
    np.testing.assert_array_equal(plate.read(refs[1]), data["B/3"][0].max(axis=1))


def test_missing_chunk_names_the_field(tmp_path):
    fields = {("A01", 1): np.ones((1, 16, 16), np.uint16)}
    p = write_plate(tmp_path / "P.zarr", fields, ["DNA"], version="0.4")
    for chunk in (p / "A" / "1" / "0" / "0").glob("0*"):
        chunk.write_bytes(b"garbage")
    plate = open_plate(p)
    with pytest.raises(InputError, match="well A01, site 1"):
        plate.read(next(plate.fields()))


def test_load_data_csv_and_platemap_join(tmp_path):
    (tmp_path / "img").mkdir()
    ld = pd.DataFrame({"Metadata_Plate": ["P1", "P1", "P1"], "Metadata_Well": ["a1", "A01", "B2"],
                       "Metadata_Site": [1, 2, 1],
                       "FileName_OrigDNA": ["d1.tif", "d2.tif", "d3.tif"], "PathName_OrigDNA": ["img"] * 3,
                       "FileName_OrigRNA": ["r1.tif", "r2.tif", "r3.tif"], "PathName_OrigRNA": ["img"] * 3})
    ld.to_csv(tmp_path / "load_data.csv", index=False)
    table, channels = read_image_table(tmp_path / "load_data.csv")
    assert channels == ["DNA", "RNA"]  # CellProfiler's Orig prefix is not part of the channel's name
    assert table["Metadata_Well"].tolist() == ["A01", "A01", "B02"]
    assert table["Path_RNA"].iloc[2] == str((tmp_path / "img" / "r3.tif").resolve())
    pm = pd.DataFrame({"Well": ["A01", "C03"], "pert_type": ["negcon", "trt"], "Compound": ["DMSO", "x"]})
    pm.to_csv(tmp_path / "map.csv", index=False)
    wells = table[["Metadata_Plate", "Metadata_Well"]].drop_duplicates()
    joined, problems = join_platemap(wells, read_platemap(tmp_path / "map.csv"))
    assert joined.set_index("Metadata_Well").loc["A01", "Metadata_pert_type"] == "negcon"
    reasons = {(p["Metadata_Well"], p["reason"]) for p in problems}
    assert reasons == {("B02", "well is not in the plate map"), ("C03", "well is in the plate map but has no profile (no images, or every site skipped)")}


def test_platemap_with_duplicate_wells_is_refused(tmp_path):
    pd.DataFrame({"Metadata_Well": ["A01", "A1"], "Metadata_pert_type": ["trt", "trt"]}).to_csv(tmp_path / "m.csv")
    with pytest.raises(InputError, match="more than once: A01"):
        read_platemap(tmp_path / "m.csv")


def test_a_folder_filled_by_two_writers_at_once_is_one_writers_whole_copy(tmp_path):
    """Two processes extracting the same registry example into the cache (two test workers, two jobs):
    the first to finish wins, the second's copy is discarded, and a failed writer leaves nothing."""
    from microsnoop_ray.io.atomic import atomic_dir

    target = tmp_path / "cache" / "example"
    with atomic_dir(target) as a, atomic_dir(target) as b:
        (a / "x.txt").write_text("a")
        (b / "x.txt").write_text("b")
        (b / "y.txt").write_text("b")
        assert not target.exists()  # nothing visible while both are writing
    assert sorted(p.name for p in target.iterdir()) == ["x.txt", "y.txt"]  # b finished first: b's copy
    assert (target / "x.txt").read_text() == "b"
    assert sorted(p.name for p in target.parent.iterdir()) == ["example"]  # a's staging folder is gone
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "failed") as c:
        (c / "part.txt").write_text("half")
        raise RuntimeError("download failed")
    assert not (tmp_path / "failed").exists() and not list(tmp_path.glob(".failed*"))


def test_wide_tables_convert_to_arrow_as_from_pandas_does(tmp_path, mlcp_cells):
    """The block-wise conversion of the site writer gives from_pandas's types and values: float32
    features from real cells, a NaN (null, as from_pandas makes it), strings with a missing value,
    integers, booleans and a categorical column (left to from_pandas)."""
    import pyarrow as pa

    from microsnoop_ray.io.write import arrow_table, read_provenance, write_parquet

    images, table = mlcp_cells
    n = 6
    feats = images[:n].reshape(n, -1)[:, :300].astype(np.float32)
    feats[2, 5] = np.nan
    df = pd.concat([pd.DataFrame({"Metadata_Plate": ["P1"] * n, "Metadata_Well": ["A01", None, "A02", "A02", "B01", "B01"],
                                  "Metadata_ObjectNumber": np.arange(1, n + 1), "Metadata_Edge": [True, False] * 3,
                                  "Metadata_Phase": pd.Categorical(table["Metadata_Phase"].to_numpy()[:n].astype(str)),
                                  "Metadata_Area": np.linspace(10, 60, n)}),
                    pd.DataFrame(feats, columns=[f"f{i}" for i in range(feats.shape[1])])], axis=1)
    expected = pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(None)
    got = arrow_table(df)
    assert got.schema.equals(expected.schema) and got.column_names == list(df.columns)
    assert got.equals(expected) and got.column("f5").null_count == 1
    write_parquet(df, tmp_path / "t.parquet", {"model": "x"})
    back = pd.read_parquet(tmp_path / "t.parquet")
    assert read_provenance(tmp_path / "t.parquet") == {"model": "x"}
    pd.testing.assert_frame_equal(back.drop(columns="Metadata_Phase"), df.drop(columns="Metadata_Phase"))
    assert back["Metadata_Phase"].astype(str).tolist() == df["Metadata_Phase"].astype(str).tolist()
