import numpy as np
import pytest

from microsnoop_ray.model.preprocess import normalize_percentile, pad_center
from reference import normalize99


@pytest.mark.parametrize("h,w", [(40, 40), (41, 68), (224, 3), (1, 1)])
def test_pad_center_puts_the_extra_row_and_column_at_the_bottom_right(h, w):
    img = np.arange(1, h * w + 1, dtype=np.uint16).reshape(h, w)
    out = pad_center(img[None], 224)[0]
    top, left = (224 - h) // 2, (224 - w) // 2
    assert out.shape == (224, 224) and out.dtype == np.float32
    np.testing.assert_array_equal(out[top:top + h, left:left + w], img)
    assert out.sum() == img.astype(np.float64).sum()


def test_pad_center_refuses_larger_images():
    with pytest.raises(ValueError, match="larger than 224"):
        pad_center(np.zeros((1, 225, 10)))


def test_normalisation_matches_reference_on_real_cells(mlcp_cells):
    planes = pad_center(mlcp_cells[0].reshape(-1, 40, 40))
    ours = normalize_percentile(planes)
    for p, o in zip(planes, ours):
        np.testing.assert_allclose(o, normalize99(p), rtol=1e-5, atol=1e-5)
    assert np.abs(ours).max() < 100


def test_constant_image_faithful_unchanged_default_zero():
    x = np.full((1, 224, 224), 500.0, dtype=np.float32)
    np.testing.assert_array_equal(normalize_percentile(x, mode="faithful"), x)
    np.testing.assert_array_equal(normalize_percentile(x, mode="default"), 0 * x)


def test_degenerate_p99_equals_p1_is_bounded_by_default_and_1e6_when_faithful():
    x = np.zeros((1, 224, 224), dtype=np.float32)
    x[0, 100:110, 100:110] = 1000.0  # 100 px < 1 % of 50176
    lo, hi = np.percentile(x, [1, 99])
    assert lo == hi == 0
    default = normalize_percentile(x)
    assert default.max() == pytest.approx(1.0) and default.min() == 0.0
    faithful = normalize_percentile(x, mode="faithful")
    assert faithful.max() == pytest.approx(1e9, rel=1e-3)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="normalization mode"):
        normalize_percentile(np.zeros((1, 4, 4)), mode="clip")


def test_torch_padding_and_normalisation_equal_numpy():
    """The encoder-side preprocessing (torch, any device) equals the NumPy path, degenerate cases included."""
    from microsnoop_ray.model.preprocess import pad_normalize_torch, preprocess

    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 65535, size=(int(rng.integers(5, 224)), int(rng.integers(5, 224)))).astype(np.uint16)
             for _ in range(20)]
    dot = np.zeros((10, 10), np.uint16)
    dot[5, 5] = 1000  # P99 == P1 but not constant
    crops += [np.full((30, 30), 500, np.uint16), np.zeros((20, 40), np.uint16), dot, np.ones((224, 224), np.float32)]
    for mode in ("default", "faithful"):
        ref = np.stack([preprocess(c[None].astype(np.float32), 224, mode)[0] for c in crops])
        got = pad_normalize_torch(crops, 224, mode).numpy()[:, 0]
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5)
