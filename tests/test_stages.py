"""The pipeline's stages and collector in-process, without Ray: compact crops in, embeddings equal to
embed(); sites complete, rows delivered twice counted once, SKIP and DROP rows accounted for."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import shared, transfluor_images
from microsnoop_ray.encode.embed import embed
from microsnoop_ray.io.sources import CellChunk, FileField, SiteKey
from microsnoop_ray.pipeline.config import CropConfig, EncodeConfig, SegmentationConfig
from microsnoop_ray.pipeline.stages import (CROP_ROW_SCHEMA, DONE, DROP, ENCODE_ROW_SCHEMA, PLANE, SKIP, CropStage,
                                           EncodeStage, SiteCollector, check_rows, concat_rows, crops_of, read_row)


def field_file() -> Path:
    return sorted(transfluor_images().glob("AS_*_O01f00d2.TIF"))[0]


@pytest.mark.parametrize("normalization", ["default", "faithful"])
def test_field_crops_travel_compact_and_encode_as_embed(untrained_weights, normalization):
    item = FileField("P|1", "O01", 0, 1, files=(str(field_file()),))  # a plate name with "|" is an ordinary key
    row = read_row({"item": item})
    image = row["image"]
    assert image.dtype == np.uint8 and row["error"] == ""
    rows = CropStage(SegmentationConfig(segmenter="classical")).process(row)
    rows = {k: v[:16] for k, v in rows.items()}  # 16 cells are enough (the encoder at 224 is slow here)
    real = rows["kind"] == PLANE
    assert real.sum() == 16 and set(rows["crop_dtype"][real]) == {"|u1"}  # the source dtype, not float32
    assert set(rows["plate"]) == {"P|1"} and rows["Metadata_ObjectNumber"].dtype == np.int64
    crops = crops_of(rows)
    for crop, r in zip(crops, pd.DataFrame({k: rows[k] for k in ("Metadata_Crop_Top", "Metadata_Crop_Bottom",
                                                                 "Metadata_Crop_Left", "Metadata_Crop_Right")})
                       .itertuples()):
        assert crop.shape == (r.Metadata_Crop_Bottom - r.Metadata_Crop_Top, r.Metadata_Crop_Right - r.Metadata_Crop_Left)
        np.testing.assert_array_equal(crop, image[0, int(r.Metadata_Crop_Top):int(r.Metadata_Crop_Bottom),
                                                  int(r.Metadata_Crop_Left):int(r.Metadata_Crop_Right)])
    sent = sum(len(b) for b in rows["crop"])
    assert sent * 4 < real.sum() * 224 * 224 * 4  # windows of ~2.5 cell diameters, uint8, against padded float32
    out = EncodeStage(EncodeConfig(weights=str(untrained_weights), device="cpu", normalization=normalization))(
        dict(rows))
    assert "crop" not in out and out["features"].shape == (len(real), 256)
    expect = embed([c[None] for c in crops], model=str(untrained_weights), normalization=normalization,
                   input_size=224)  # field crops keep the 224 input
    np.testing.assert_allclose(out["features"][real], expect, atol=1e-5)


def test_cell_array_chunk_keeps_native_crops(untrained_weights, tmp_path):
    cells = np.load(shared("bbbc021_chx", "cells.npz"))["images"][:6]
    np.save(tmp_path / "cells.npy", cells)
    item = CellChunk("W4", "B02", 1, 3, path=str(tmp_path / "cells.npy"), rows=tuple(range(6)),
                     object_numbers=tuple(range(1, 7)), site_planes=18)
    rows = CropStage().process(read_row({"item": item}))
    assert list(rows["crop_h"]) == [68] * 18 and set(rows["crop_dtype"]) == {"<u2"}
    assert sum(len(b) for b in rows["crop"]) * 20 < 18 * 224 * 224 * 4  # 9 KiB per plane instead of 196 KiB
    # 68-px cells: the job resolves input size auto to 64 (with_input_size); the stage takes the number
    check_rows(rows, CROP_ROW_SCHEMA)
    out = EncodeStage(EncodeConfig(weights=str(untrained_weights), device="cpu", input_size="64"))(dict(rows))
    check_rows(out, ENCODE_ROW_SCHEMA)
    expect = embed(cells, model=str(untrained_weights)).reshape(18, 256)
    np.testing.assert_allclose(out["features"], expect, atol=1e-5)


def _encoded(rows: dict) -> dict:
    """Rows as the encoder hands them on (features stand in for a forward pass: the collector only
    moves them)."""
    out = {k: v for k, v in rows.items() if k not in ("crop", "crop_h", "crop_w", "crop_dtype")}
    out["features"] = np.tile(out["Metadata_ObjectNumber"][:, None].astype(np.float32), (1, 256))
    return out


def test_the_row_schema_check_names_what_differs():
    rows = {"plate": np.array(["P"], dtype=object), "site": np.array([1.5])}
    with pytest.raises(TypeError, match="missing"):
        check_rows(rows, CROP_ROW_SCHEMA)
    with pytest.raises(TypeError, match=r"wrong dtype \['site'\]"):
        check_rows(rows, {"plate": "O", "site": "i"})


def test_collector_completes_sites_counts_duplicates_once_and_accounts_for_skips(tmp_path):
    cells = np.random.default_rng(0).integers(0, 4000, (5, 2, 40, 40)).astype(np.uint16)
    cells = cells.astype(np.float32)
    cells[3, 1, 5, 5] = np.nan  # one unusable cell: a DROP row, the site still completes
    np.save(tmp_path / "cells.npy", cells)
    chunk = dict(n_channels=2, path=str(tmp_path / "cells.npy"), site_planes=10)
    first = CellChunk("P|x", "A01", 1, rows=(0, 1, 2), object_numbers=(1, 2, 3), **chunk)
    second = CellChunk("P|x", "A01", 1, rows=(3, 4), object_numbers=(4, 5), **chunk)
    broken = CellChunk("P|x", "A02", 1, 2, path=str(tmp_path / "missing.npy"), rows=(0,), object_numbers=(1,),
                       site_planes=2)
    crop = CropStage()
    cropped = [crop.process(read_row({"item": it})) for it in (first, second, broken)]
    for rows in cropped:  # plane, DROP and SKIP rows: one schema
        check_rows(rows, CROP_ROW_SCHEMA)
    parts = [_encoded(rows) for rows in cropped]
    assert set(parts[1]["kind"]) == {PLANE, DROP} and list(parts[2]["kind"]) == [SKIP]
    assert "plate P|x, well A02, site 1" in parts[2]["reason"][0] and "missing.npy" in parts[2]["reason"][0]
    written, skipped, order = {}, {}, []
    collector = SiteCollector(lambda key, c, dropped, rejected, arithmetic: written.update({key: (c, dropped)}),
                              lambda key, reason: skipped.update({key: reason}), {"P|x": ["a", "b"]},
                              on_site=lambda key, c: order.append(key))
    collector.add(parts[0])
    assert not written and collector.incomplete() == [SiteKey("P|x", "A01", 1)]
    collector.add(parts[0])  # a retried task delivers the same rows again
    assert collector.duplicates == len(parts[0]["kind"]) and not written
    collector.add({k: np.concatenate([parts[1][k], parts[2][k]]) for k in parts[1]})
    assert collector.incomplete() == [] and order == [SiteKey("P|x", "A01", 1), SiteKey("P|x", "A02", 1)]
    table, dropped = written[SiteKey("P|x", "A01", 1)]
    assert table["Metadata_ObjectNumber"].tolist() == [1, 2, 3, 5]
    assert dropped == [{"Metadata_ObjectNumber": 4, "reason": "plate P|x, well A01, site 1: cell 4: has NaN or "
                                                            "infinite pixels"}]
    np.testing.assert_array_equal(table["Microsnoop_b_000"], [1, 2, 3, 5])  # channels side by side, in order
    assert list(skipped) == [SiteKey("P|x", "A02", 1)]
    collector.add(parts[0])  # rows of a site already written are ignored
    assert len(written) == 1 and collector.sites_done == 2


def test_the_encoder_writes_the_sites_it_finishes_and_hands_on_the_rest(tmp_path, untrained_weights, mlcp_cells):
    """Site as the unit: a site whose planes all came in one encoder call is written there and leaves as
    one DONE row; a site split over calls leaves encoded, and the driver's collector finishes it. The
    files equal those the collector writes from the same planes, and a retried call writes nothing twice."""
    from microsnoop_ray.io.sources import PlateInfo
    from microsnoop_ray.pipeline.layout import Layout
    from microsnoop_ray.pipeline.plate_job import SiteSink

    np.save(tmp_path / "cells.npy", mlcp_cells[0][:6])
    chunk = dict(n_channels=3, path=str(tmp_path / "cells.npy"))
    whole = CellChunk("P", "A01", 1, rows=(0, 1, 2), object_numbers=(1, 2, 3), site_planes=9, **chunk)
    split = [CellChunk("P", "A02", 1, rows=(3, 4), object_numbers=(1, 2), site_planes=9, **chunk),
             CellChunk("P", "A02", 1, rows=(5,), object_numbers=(3,), site_planes=9, **chunk)]
    crop = CropStage()
    rows = [crop.process(read_row({"item": it})) for it in [whole] + split]
    names = ["DNA", "ER", "RNA"]

    def sink(root):
        root.mkdir()  # the job makes it (run_config.yaml) before any actor starts
        plates = {"P": PlateInfo("P", "b1", names, "cells.npy", [SiteKey("P", "A01", 1), SiteKey("P", "A02", 1)])}
        return SiteSink(Layout(root, "m"), plates, None, {"run": "test"}, {})

    workers = sink(tmp_path / "workers")
    stage = EncodeStage(EncodeConfig(weights=str(untrained_weights), batch_size=4), "cpu", sink=workers,
                        channels={"P": names})
    out = stage(concat_rows(rows[:2]))  # the whole site and the first chunk of the split one
    done = out["kind"] == DONE
    assert done.sum() == 1 and out["cells"][done].tolist() == [3] and out["count"][done].tolist() == [9]
    assert set(out["kind"][~done]) == {PLANE} and (out["well"][~done] == "A02").all()
    site = tmp_path / "workers" / "embeddings" / "m" / "b1" / "P" / "A01-1" / "embeddings.parquet"
    stamp = site.stat().st_mtime_ns
    collector = SiteCollector(workers.site, workers.skip, {"P": names})
    collector.add(out)
    collector.add(stage(rows[2]))  # a call that finishes nothing: its rows go to the collector
    assert collector.incomplete() == [] and (collector.sites_written, collector.sites_skipped) == (2, 0)
    again = stage(concat_rows(rows[:2]))  # a retried call: the site is not written again
    assert site.stat().st_mtime_ns == stamp and (again["kind"] == DONE).sum() == 1

    driver = sink(tmp_path / "driver")  # the same planes, every site written by the collector
    plain = EncodeStage(EncodeConfig(weights=str(untrained_weights), batch_size=4), "cpu")
    by_driver = SiteCollector(driver.site, driver.skip, {"P": names})
    for r in rows:
        by_driver.add(plain(r))
    for well in ("A01", "A02"):
        a, b = (pd.read_parquet(tmp_path / d / "embeddings" / "m" / "b1" / "P" / f"{well}-1" / "embeddings.parquet")
                for d in ("workers", "driver"))
        pd.testing.assert_frame_equal(a, b)


def test_a_bug_in_a_stage_is_not_an_input_error(tmp_path):
    """Only InputError becomes a skipped site; any other exception propagates with its traceback."""
    class Broken(FileField):
        def pixels(self):
            raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        read_row({"item": Broken("P", "A01", 1, 1, files=(str(field_file()),))})
    missing = read_row({"item": FileField("P", "A01", 1, 1, files=(str(tmp_path / "nope.tif"),))})
    assert missing["error"].startswith("plate P, well A01, site 1: ") and "does not exist" in missing["error"]
    with pytest.raises(ValueError, match="mode must be one of"):
        CropStage(crop=CropConfig(mode="bogus")).process(read_row({"item": FileField("P", "A01", 1, 1,
                                                                                       files=(str(field_file()),))}))
