"""The pipeline's stage objects in-process, without Ray: compact crops in, embeddings equal to embed()."""
import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import TRANSFLUOR, shared
from microsnoop_ray.encode import embed
from microsnoop_ray.pipeline.stages import PLANE, CropStage, EncodeStage, crops_of


def _field_item(image):
    return {"kind": "files", "plate": "P|1", "well": "O01", "site": 0, "n_channels": 1, "nuclei_channel": 0,
            "error": "", "image": image, "labels": None}


@pytest.mark.parametrize("normalization", ["default", "faithful"])
def test_field_crops_travel_compact_and_encode_as_embed(untrained_weights, normalization):
    image = tifffile.imread(sorted(TRANSFLUOR.glob("AS_*_O01f00d2.TIF"))[0])[None]
    assert image.dtype == np.uint8
    rows = CropStage({"segmenter": "classical"}).process(_field_item(image))
    rows = {k: v[:16] for k, v in rows.items()}  # 16 cells are enough (the encoder at 224 is slow here)
    real = rows["kind"] == PLANE
    assert real.sum() == 16 and set(rows["crop_dtype"][real]) == {"|u1"}  # the source dtype, not float32
    crops = crops_of(rows)
    for crop, r in zip(crops, pd.DataFrame({k: rows[k] for k in ("Metadata_Crop_Top", "Metadata_Crop_Bottom",
                                                                 "Metadata_Crop_Left", "Metadata_Crop_Right")})
                       .itertuples()):
        assert crop.shape == (r.Metadata_Crop_Bottom - r.Metadata_Crop_Top, r.Metadata_Crop_Right - r.Metadata_Crop_Left)
        np.testing.assert_array_equal(crop, image[0, int(r.Metadata_Crop_Top):int(r.Metadata_Crop_Bottom),
                                                  int(r.Metadata_Crop_Left):int(r.Metadata_Crop_Right)])
    sent = sum(len(b) for b in rows["crop"])
    assert sent * 4 < real.sum() * 224 * 224 * 4  # windows of ~2.5 cell diameters, uint8, against padded float32
    out = EncodeStage(str(untrained_weights), device="cpu", normalization=normalization)(dict(rows))
    assert "crop" not in out and out["features"].shape == (len(real), 256)
    expect = embed([c[None] for c in crops], model=str(untrained_weights), normalization=normalization)
    np.testing.assert_allclose(out["features"][real], expect, atol=1e-5)


def test_cell_array_chunk_keeps_native_crops(untrained_weights):

    cells = np.load(shared("bbbc021_chx", "cells.npz"))["images"][:6]
    meta = pd.DataFrame({"Metadata_Well": "B02", "Metadata_Site": 1, "Metadata_ObjectNumber": np.arange(1, 7),
                         "site_planes": 18})
    item = {"kind": "cells", "plate": "W4", "well": "B02", "site": 1, "n_channels": 3, "error": "", "image": cells,
            "cells_meta": meta.to_json(orient="records")}
    rows = CropStage({}).process(item)
    assert list(rows["crop_h"]) == [68] * 18 and set(rows["crop_dtype"]) == {"<u2"}
    assert sum(len(b) for b in rows["crop"]) * 20 < 18 * 224 * 224 * 4  # 9 KiB per plane instead of 196 KiB
    out = EncodeStage(str(untrained_weights), device="cpu")(dict(rows))
    expect = embed(cells, model=str(untrained_weights)).reshape(18, 256)
    np.testing.assert_allclose(out["features"], expect, atol=1e-5)
