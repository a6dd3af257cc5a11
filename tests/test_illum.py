"""Illumination correction on the real Transfluor row (CellProfiler's ExampleIlluminationCorrection)."""
import re

import numpy as np
import pytest
import tifffile

from conftest import transfluor_images
from microsnoop_ray.errors import InputError
from microsnoop_ray.io.illum import (IllumAccumulator, correct, flatness, illum_function, illum_paths, load_functions,
                                     save_functions)


@pytest.fixture(scope="module")
def transfluor_fields():
    files = sorted(transfluor_images().glob("AS_*_O*f*d2.TIF"))
    assert len(files) == 72  # 24 wells x 3 fields
    wells = [int(re.search(r"_O(\d\d)f", f.name).group(1)) for f in files]
    return np.stack([tifffile.imread(f).astype(np.float32) for f in files]), np.array(wells)


def test_correction_flattens_fields_it_was_not_fitted_on(transfluor_fields):
    images, wells = transfluor_fields
    fit, held = images[wells <= 12], images[wells > 12]
    acc = IllumAccumulator()
    for im in fit:
        acc.add(im[None])
    funcs = acc.functions()
    assert funcs.shape == (1, 512, 512) and funcs.dtype == np.float32
    assert funcs.min() == pytest.approx(1.0, abs=0.05) and funcs.max() > 1.5  # the vignetting it was made for
    before = flatness(held)
    after = flatness([correct(im[None], funcs)[0] for im in held])
    # coefficient of variation of the 8 x 8 block means of the averaged held-out fields
    assert before > 0.15 and after < before / 4, (before, after)


def test_functions_round_trip_in_cell_painting_gallery_names(tmp_path, transfluor_fields):
    images, _ = transfluor_fields
    funcs = np.stack([illum_function(images.mean(0))])
    paths = save_functions(tmp_path, "Transfluor", ["GFP"], funcs)
    assert paths == illum_paths(tmp_path, "Transfluor", ["GFP"])
    assert paths[0] == tmp_path / "Transfluor" / "Transfluor_IllumGFP.npy"
    assert paths[0].with_suffix(".png").stat().st_size > 5_000
    np.testing.assert_array_equal(load_functions(paths), funcs)
    with pytest.raises(InputError, match="Transfluor_IllumDNA.npy.*does not exist"):
        load_functions(illum_paths(tmp_path, "Transfluor", ["DNA"]))
    acc = IllumAccumulator()
    acc.add(np.ones((1, 8, 8)))
    with pytest.raises(InputError, match="shape"):
        acc.add(np.ones((1, 8, 9)))
    assert np.all(illum_function(np.zeros((64, 64))) == 1.0)  # an empty channel is left as it is
