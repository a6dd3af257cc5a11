import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile

from microsnoop_ray import Encoder, load_model
from microsnoop_ray.crop.field import prepare_field
from microsnoop_ray.crop.windows import (bboxes_from_centres, crop_cells, object_bboxes, rescale_field, tile_field,
                                 tile_starts)
from microsnoop_ray.segment import CellposeSegmenter, resolve_cellpose_weights, segment_classical


@pytest.fixture(scope="module")
def encoder(published_ckpt):
    return Encoder(load_model(published_ckpt))


def reference_windows(mask, rc_const=2.5, sta=224):
    """Independent computation of the published window formula, object by object."""
    H, W = mask.shape
    out = {}
    for j in np.setdiff1d(np.unique(mask), [0]):
        rr, cc = np.where(mask == j)
        rl, rh, cl, ch = rr.min(), rr.max(), cc.min(), cc.max()
        if rl == 0 or cl == 0 or rh == H or ch == W:  # the reference's (defective) border test
            continue
        size = max(rh - rl, ch - cl) * rc_const
        size = min(size, sta // 2)
        r_c, c_c = rl + (rh - rl) // 2, cl + (ch - cl) // 2
        out[int(j)] = (max(int(r_c - size), 0), min(int(r_c + size), H), max(int(c_c - size), 0), min(int(c_c + size), W))
    return out


@pytest.mark.parametrize("rc", [2.5, 2.0, 1.0])
def test_faithful_windows_match_independent_formula_on_real_masks(stardist_nuclei, rc):
    img, mask = stardist_nuclei
    crops, table, rejected = crop_cells(img, mask, rescale_constant=rc, border="faithful")
    ref = reference_windows(mask, rc)
    assert sorted(table["Metadata_ObjectNumber"]) == sorted(ref)
    for row, crop in zip(table.itertuples(), crops):
        t, b, l, r = ref[row.Metadata_ObjectNumber]
        assert (row.Metadata_Crop_Top, row.Metadata_Crop_Bottom, row.Metadata_Crop_Left, row.Metadata_Crop_Right) == (t, b, l, r)
        h, w = b - t, r - l
        top, left = (224 - h) // 2, (224 - w) // 2
        np.testing.assert_array_equal(crop[0, top:top + h, left:left + w], img[t:b, l:r])
        assert crop[0].sum() == pytest.approx(float(img[t:b, l:r].sum()))
    assert len(rejected) == len(np.unique(mask)) - 1 - len(ref)


def test_default_border_mode_drops_objects_touching_any_edge(stardist_nuclei):
    img, mask = stardist_nuclei
    boxes = object_bboxes(mask)
    edge = (boxes.r0 == 0) | (boxes.c0 == 0) | (boxes.r1 == 511) | (boxes.c1 == 511)
    _, table, rejected = crop_cells(img, mask)
    assert set(table["Metadata_ObjectNumber"]) == set(boxes.label[~edge])
    assert set(rejected["Metadata_ObjectNumber"]) == set(boxes.label[edge])
    assert rejected["reason"].str.contains("border").all()
    assert (boxes.r1 == 511).any() or (boxes.c1 == 511).any()  # the case the faithful mode misses exists here
    _, kept, _ = crop_cells(img, mask, border="keep")
    assert len(kept) == len(boxes)


def test_one_pixel_object_is_reported_not_cropped():
    img = np.random.default_rng(0).integers(0, 1000, (1, 64, 64)).astype(np.uint16)
    lab = np.zeros((64, 64), np.int32)
    lab[30, 30] = 1
    lab[10:20, 40:52] = 2
    crops, table, rejected = crop_cells(img, lab)
    assert table["Metadata_ObjectNumber"].tolist() == [2]
    assert rejected["Metadata_ObjectNumber"].tolist() == [1] and "too small" in rejected["reason"].iloc[0]
    assert crops.shape == (1, 1, 224, 224) and crops[0].any()


def test_classical_segmenter_counts_real_nuclei(stardist_nuclei):
    img, mask = stardist_nuclei
    n_true = len(np.unique(mask)) - 1
    labels = segment_classical(img, diameter=16)
    assert labels.dtype == np.int32 and labels.shape == img.shape
    assert abs(labels.max() - n_true) <= 0.1 * n_true
    assert len(np.unique(labels)) - 1 == labels.max()


@pytest.mark.slow
def test_cellpose_with_real_weights_counts_cells_and_batches(registry_example):
    import skimage.io
    assets = registry_example("scellseg-assets")
    weights = resolve_cellpose_weights(assets / "pretrained_models" / "cellpose")
    seg = CellposeSegmenter(weights, diameter=30)
    names = ("095", "097")
    imgs = [skimage.io.imread(assets / "contrast_data" / "Kc167" / f"{n}_img.png") for n in names]
    truth = [len(np.unique(skimage.io.imread(assets / "contrast_data" / "Kc167" / f"{n}_masks.png"))) - 1 for n in names]
    batched = seg([i[..., 2] for i in imgs], cyto=[i[..., 1] for i in imgs])
    for lab, n in zip(batched, truth):
        assert abs(lab.max() - n) <= 0.1 * n, (lab.max(), n)
    single = seg([imgs[1][..., 2]], cyto=[imgs[1][..., 1]])[0]
    np.testing.assert_array_equal(single, batched[1])


def test_cellpose_named_model_is_never_downloaded(tmp_path, monkeypatch):
    from microsnoop_ray import InputError
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path))
    with pytest.raises(InputError, match="does not download"):
        resolve_cellpose_weights("cyto3")


def test_jump_field_crops_around_supplied_centres(registry_example, encoder):
    site = registry_example("jump-field") / "BR00116991" / "A01-1"
    dna = tifffile.imread(site / "r01c01f01p01-ch5sk1fk1fl1.tiff")
    nuc = pd.read_csv(site / "Nuclei.csv", usecols=["ObjectNumber", "AreaShape_Center_X", "AreaShape_Center_Y"])
    assert len(nuc) == 109
    boxes = bboxes_from_centres(nuc.AreaShape_Center_X, nuc.AreaShape_Center_Y, 30, dna.shape, nuc.ObjectNumber)
    crops, table, rejected = crop_cells(dna, bboxes=boxes, border="keep")
    assert len(crops) == 109 and len(rejected) == 0
    assert np.abs(table.Metadata_Location_Center_X - nuc.AreaShape_Center_X).max() <= 1.0
    assert np.abs(table.Metadata_Location_Center_Y - nuc.AreaShape_Center_Y).max() <= 1.0
    assert ((table.Metadata_Crop_Bottom - table.Metadata_Crop_Top) <= 150).all()
    # nuclei are bright: the crop centre is brighter than the crop average
    centre = crops[:, 0, 108:116, 108:116].mean(axis=(1, 2))
    assert np.median(centre / crops[:, 0].sum(axis=(1, 2)) * (crops[:, 0] > 0).sum(axis=(1, 2))) > 1.5


def test_tile_starts_follow_the_method():
    assert tile_starts(1080).tolist() == np.linspace(0, 1080 - 224, 6).astype(int).tolist()
    assert tile_starts(224).tolist() == [0] and tile_starts(100).tolist() == [0]
    assert len(tile_starts(1080, overlap=0.0)) == len(tile_starts(1080, overlap=0.05))
    assert len(tile_starts(1080, overlap=0.9)) == len(tile_starts(1080, overlap=0.5))


def test_tile_and_rescale_modes_on_a_real_field(stardist_nuclei):
    img = stardist_nuclei[0][None, :400, :300]
    tiles, table = tile_field(img)
    assert tiles.shape == (len(tile_starts(400)) * len(tile_starts(300)), 1, 224, 224)
    prep = prepare_field(img, mode="tiles")
    np.testing.assert_array_equal(prep.crops, tiles.astype(np.float32))
    assert len(prep.objects) == len(tiles) and prep.skip_reason is None
    sq = rescale_field(img)
    assert sq.shape == (1, 224, 224)
    np.testing.assert_array_equal(prepare_field(img, mode="rescale").crops, sq[None].astype(np.float32))


def test_fields_without_cells_are_skipped_not_zero():
    blank = np.zeros((2, 128, 128), np.uint16)
    prep = prepare_field(blank, labels=np.zeros((128, 128), int), where="P1/A01/1")
    assert len(prep.crops) == 0 and "P1/A01/1" in prep.skip_reason and "constant" in prep.skip_reason
    noisy = np.random.default_rng(1).integers(0, 50, (2, 128, 128)).astype(np.uint16)
    prep = prepare_field(noisy, labels=np.zeros((128, 128), int), where="P1/A02/1")
    assert len(prep.crops) == 0 and "no cells" in prep.skip_reason
    nan = noisy.astype(float)
    nan[0, 3, 3] = np.nan
    assert "NaN" in prepare_field(nan, mode="tiles").skip_reason


def test_fields_cli_with_supplied_masks_and_a_blank_field(tmp_path, published_ckpt, stardist_nuclei):
    img, mask = stardist_nuclei
    img, mask = img[:256, :256], mask[:256, :256]
    tifffile.imwrite(tmp_path / "good.tif", img)
    tifffile.imwrite(tmp_path / "blank.tif", np.zeros_like(img))
    tifffile.imwrite(tmp_path / "good_masks.tif", mask.astype(np.uint16))
    tifffile.imwrite(tmp_path / "blank_masks.tif", np.zeros_like(mask, dtype=np.uint16))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "microsnoop_ray.cli", "fields", tmp_path / "good.tif", tmp_path / "blank.tif",
                        "--masks", tmp_path / "good_masks.tif", tmp_path / "blank_masks.tif", "--weights", published_ckpt,
                        "--out", out, "--png", "--channel-names", "DNA", "--rescale-constant", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 3, r.stderr
    expected_cells = len(crop_cells(img, mask, rescale_constant=2)[0])
    fields = pd.read_parquet(out / "fields.parquet")
    assert fields["Metadata_FileName"].tolist() == ["good.tif"]
    assert fields["Metadata_Object_Count"].tolist() == [expected_cells]
    cells = pd.read_parquet(out / "cells.parquet")
    assert len(cells) == expected_cells
    feats = [c for c in cells.columns if c.startswith("Microsnoop_DNA_")]
    assert len(feats) == 256
    np.testing.assert_allclose(fields[feats].to_numpy()[0], cells[feats].to_numpy().mean(axis=0), atol=1e-6)
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped["Metadata_FileName"].tolist() == ["blank.tif"] and "constant" in skipped["reason"].iloc[0]
    assert (out / "qc" / "good.png").stat().st_size > 10_000
