"""Bad input through the plate pipeline: every field is profiled or listed with its reason, the
command's exit status says whether anything was skipped, and unusable settings fail clearly."""
import json

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from conftest import transfluor_images
from microsnoop_ray.cli import main
from microsnoop_ray.errors import InputError
from microsnoop_ray.io.zarr_plate import open_plate, write_plate
from microsnoop_ray.io.sources import SiteKey
from microsnoop_ray.pipeline.layout import Layout


def _real():
    return tifffile.imread(transfluor_images() / "AS_09047_050428030001_O01f00d2.TIF")


@pytest.fixture(scope="module")
def bad_run(ray_session, untrained_weights, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-inputs")
    real = _real()
    two = np.stack([real, real[::-1]])  # two channels
    flat = np.full_like(two, 100)
    flat[:, 5, 7] = 101  # not constant, but no cell: one-pixel "objects" only
    fields = {("A01", 1): two, ("A02", 1): two.copy(), ("A03", 1): two.copy(), ("A04", 1): flat,
              ("A05", 1): two[:, :300, :256].copy()}  # a field of another size in the same plate
    plate = write_plate(tmp / "Mixed.zarr", fields, ["GFP", "GFP_flipped"], version="0.4", chunk=256)
    (plate / "A" / "2" / "0" / "0" / "1.0.1").unlink()  # one chunk of the second channel's plane is lost
    import zarr
    zarr.open_group(str(plate / "A" / "3" / "0"), mode="r+", zarr_format=2).create_array(
        "0", data=real[None], chunks=(1,) + real.shape, overwrite=True)  # this field lost a channel
    # a second plate from a load_data table that lists one site twice
    files = sorted(transfluor_images().glob("AS_*_O0[12]f00d2.TIF"))
    ld = pd.DataFrame({"Metadata_Plate": "TF", "Metadata_Well": ["O01", "O02"], "Metadata_Site": 1,
                       "FileName_GFP": [f.name for f in files], "PathName_GFP": str(transfluor_images())})
    pd.concat([ld, ld.iloc[[1]]]).to_csv(tmp / "load_data.csv", index=False)
    # a plate map without negative controls, missing A05 and naming A07, which the plate lacks
    pd.DataFrame({"Metadata_Plate": "Mixed", "well_position": ["A01", "A02", "A03", "A04", "A07"],
                  "pert_type": "trt", "Compound": "cpd", "Concentration": 1.0}).to_csv(tmp / "map.csv", index=False)
    args = ["profile", str(plate), str(tmp / "load_data.csv"), "--platemap", str(tmp / "map.csv"),
            "--out", str(tmp / "out"), "--weights", str(untrained_weights), "--segmenter", "classical",
            "--max-cells-per-site", "2", "--quiet"]
    return tmp, args, main(args)


@pytest.mark.slow
def test_every_field_is_profiled_or_listed_with_its_reason(bad_run):
    tmp, args, status = bad_run
    assert status == 3  # something was skipped
    skipped = pd.read_csv(tmp / "out" / "skipped.csv")
    mixed = skipped[skipped["Metadata_Plate"] == "Mixed"]
    sites = mixed[mixed["kind"] == "site not profiled"].set_index("Metadata_Well")["reason"]
    assert sorted(sites.index) == ["A02", "A03", "A04"]
    assert "1 Zarr chunk(s) missing in 1 image plane(s)" in sites["A02"] and "well A02, site 1" in sites["A02"]
    assert "1 channels, but the plate has 2" in sites["A03"]
    assert "no cells to profile" in sites["A04"]
    dup = skipped[skipped["kind"] == "duplicate field"]
    assert dup["Metadata_Well"].tolist() == ["O02"] and "load_data.csv" in dup["reason"].iloc[0]
    notes = mixed[mixed["kind"] == "plate map"].set_index("Metadata_Well")["reason"]
    assert notes["A05"] == "well is not in the plate map" and "has no profile" in notes["A07"]
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    assert summary["plates"]["Mixed"]["wells"] == 2  # A01 and the smaller A05
    profiled = summary["plates"]["TF"]["sites"]
    tf = skipped[(skipped["Metadata_Plate"] == "TF") & (skipped["kind"] == "site not profiled")]
    assert profiled + len(tf) == 2  # O01 and O02 site 1, each profiled or listed once
    assert summary["sphering"] == {"applied": False, "reason": "no negcon wells"}
    wells = pd.read_parquet(next((tmp / "out").glob("profiles/*/default/Mixed/Mixed.parquet")))
    assert wells["Metadata_Well"].tolist() == ["A01", "A05"]
    assert wells.loc[wells["Metadata_Well"] == "A05", "Metadata_Compound"].isna().all()  # not in the map


def test_required_sphering_without_controls_is_a_clear_error(bad_run, capsys):
    tmp, args, _ = bad_run
    assert main(args + ["--sphering-required"]) == 2
    err = capsys.readouterr().err
    assert "negcon" in err or "negative control" in err


@pytest.mark.parametrize("kind", ["garbage", "tensor", "missing"])
def test_unusable_weights_stop_the_job_naming_the_file(bad_run, kind, capsys):
    tmp, args, _ = bad_run
    bad = tmp / f"{kind}.pt"
    if kind == "garbage":
        bad.write_bytes(b"\x00not a checkpoint" * 50)
    elif kind == "tensor":
        torch.save(torch.zeros(4), bad)
    i = args.index("--weights")
    assert main(args[:i + 1] + [str(bad)] + args[i + 2:] + ["--out", str(tmp / f"out-{kind}")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and err.count("\n") == 1


def test_missing_chunk_is_refused_unless_allowed_and_an_empty_channel_is_not_missing(tmp_path):
    img = np.ones((2, 32, 32), np.uint16)
    img[1] = 0  # an empty channel: zarr stores none of its chunks
    p = write_plate(tmp_path / "P.zarr", {("B02", 1): img}, ["a", "b"], version="0.5", chunk=16)
    plate = open_plate(p)
    ref = next(plate.fields())
    np.testing.assert_array_equal(plate.read(ref), img)
    chunks = sorted(c for c in (p / "B" / "2" / "0" / "0" / "c").rglob("*") if c.is_file())
    assert len(chunks) == 4  # 2 x 2 chunks of the first channel only
    chunks[1].unlink()
    with pytest.raises(InputError, match="well B02, site 1: 1 Zarr chunk.s. missing in 1 image plane"):
        plate.read(ref)
    assert plate.read(ref, allow_missing_chunks=True)[0].sum() == 32 * 32 - 16 * 16


def test_missing_chunk_check_fails_loudly_when_it_cannot_look(tmp_path, monkeypatch):
    """A store that cannot be listed (or holds keys the check cannot place) is an error naming the
    field, never a read that silently skips the check."""
    import zarr.storage

    p = write_plate(tmp_path / "P.zarr", {("B02", 1): np.ones((1, 32, 32), np.uint16)}, ["a"], version="0.4",
                    chunk=16)
    plate = open_plate(p)
    ref = next(plate.fields())
    assert plate.read(ref).sum() == 32 * 32  # v2 keys ("0.0.0") are understood

    async def refuse(self, prefix):
        raise PermissionError("listing denied")
        yield  # an async generator, as the store's own
    monkeypatch.setattr(zarr.storage.LocalStore, "list_prefix", refuse)
    with pytest.raises(InputError, match="well B02, site 1: cannot check which Zarr chunks are stored "
                                         r"\(PermissionError: listing denied\)"):
        plate.read(ref)
    monkeypatch.undo()
    (p / "B" / "2" / "0" / "0" / "stray.txt").write_text("not a chunk")
    with pytest.raises(InputError, match="unexpected key 'stray.txt'"):
        plate.read(ref)


@pytest.mark.parametrize("name", ["..", "a/b", "", "x\x00"])
def test_output_paths_cannot_escape_the_root(tmp_path, name):
    with pytest.raises(InputError, match="safe name"):
        Layout(tmp_path, "m").site_dir("batch", SiteKey(name, "A01", 1))


def test_symlink_out_of_the_output_root_is_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    root = tmp_path / "out"
    (root / "embeddings").mkdir(parents=True)
    (root / "embeddings" / "m").symlink_to(outside)
    with pytest.raises(InputError, match="escapes the output root"):
        Layout(root, "m").site_dir("batch", SiteKey("P", "A01", 1))


def test_profile_refuses_loose_image_files_and_names_them(tmp_path):
    from microsnoop_ray.pipeline.plate_job import ProfileConfig, list_work

    tifffile.imwrite(tmp_path / "field.tif", np.ones((32, 32), np.uint16))
    cfg = ProfileConfig.from_mapping({"inputs": [str(tmp_path / "field.tif")], "out": str(tmp_path / "out")})
    with pytest.raises(InputError, match=r"field\.tif: an image file without a plate and well.*microsnoop-ray fields"):
        list_work(cfg)
