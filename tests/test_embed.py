import numpy as np
import pytest

from microsnoop_ray import Encoder, InputError, embed, load_model


@pytest.fixture(scope="module")
def encoder(published_ckpt):
    return Encoder(load_model(published_ckpt), precision="fp32")  # tolerances of 1e-6: the exact arithmetic


def test_chunking_does_not_change_results(encoder, mlcp_cells):
    images = mlcp_cells[0][:5]
    a = embed(images, batch_size=1, encoder=encoder)
    b = embed(images, batch_size=7, encoder=encoder)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_channels_are_embedded_separately_and_concatenated_in_order(encoder, mlcp_cells):
    images = mlcp_cells[0][:3]
    full = embed(images, encoder=encoder)
    swapped = embed(images[:, ::-1].copy(), encoder=encoder)
    single = embed(images[:, 1:2], encoder=encoder)
    np.testing.assert_allclose(full[:, 256:512], single, atol=1e-6)
    np.testing.assert_allclose(full[:, :256], swapped[:, 512:], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(full.reshape(3, 3, 256), axis=2), 1.0, atol=1e-5)


def test_list_of_mixed_sizes_equals_per_size_arrays(encoder, mlcp_cells):
    a, b = mlcp_cells[0][0], mlcp_cells[0][1][:, 3:30, 5:40]
    mixed = embed([a, b], encoder=encoder)
    np.testing.assert_allclose(mixed[0], embed(a[None], encoder=encoder)[0], atol=1e-6)
    np.testing.assert_allclose(mixed[1], embed(b[None], encoder=encoder)[0], atol=1e-6)


def test_memmapped_input_streams(tmp_path, encoder, mlcp_cells):
    np.save(tmp_path / "x.npy", mlcp_cells[0][:4])
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    np.testing.assert_allclose(embed(mm, encoder=encoder, batch_size=3),
                               embed(mlcp_cells[0][:4], encoder=encoder), atol=1e-6)


@pytest.mark.parametrize("images,match", [
    (np.zeros((2, 40, 40)), "3 dimensions"),
    (np.zeros((2, 1, 225, 40)), "larger than 224"),
    (np.array([[[["a"]]]]), "not numeric"),
    (np.zeros((0, 1, 4, 4)), "no images"),
])
def test_bad_arrays_are_refused_with_their_source(encoder, images, match):
    with pytest.raises(InputError, match=match) as info:
        embed(images, encoder=encoder, source="cells.npy")
    assert "cells.npy" in str(info.value)


def test_nan_pixels_name_the_image(encoder):
    x = np.ones((3, 1, 20, 20), dtype=np.float32)
    x[2, 0, 4, 4] = np.nan
    with pytest.raises(InputError, match="image 2 has NaN"):
        embed(x, encoder=encoder, source="s.npy")


def test_cuda_request_without_cuda_is_a_clear_error(published_ckpt):
    import torch
    if torch.cuda.is_available():
        assert Encoder(published_ckpt, device="cuda").device.type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            Encoder(published_ckpt, device="cuda")


def test_bf16_stays_faithful_to_fp32_on_real_cells(mlcp_cells):
    """The default weights on real cells: bf16 (the residual blocks after the first) moves the centred
    embeddings by at most 0.05 of their length (the median over cells), and it does compute in bf16."""
    from microsnoop_ray.evaluate.metrics import centred_relative_error

    images = mlcp_cells[0]
    ref = embed(images, encoder=Encoder(precision="fp32"))
    low_enc = Encoder(precision="bf16")
    low = embed(images, encoder=low_enc)
    assert low_enc.arithmetic["precision"] == "bf16" and "normalisation" in low_enc.arithmetic["fp32"]
    err = centred_relative_error(low, ref)
    assert 1e-4 < err <= 0.05, err
    np.testing.assert_allclose(np.linalg.norm(low.reshape(len(images), 3, 256), axis=2), 1.0, atol=1e-5)


def test_auto_precision_follows_what_the_device_offers(monkeypatch, published_ckpt):
    import torch

    from microsnoop_ray.encode import precision as precision_module

    model = load_model(published_ckpt)
    monkeypatch.setattr(precision_module, "native_bf16", lambda device: None)
    plain = Encoder(model, precision="auto")
    assert plain.precision == "fp32" and plain.arithmetic["asked"] == "auto" and "no native bf16" in plain.arithmetic["why"]
    monkeypatch.setattr(precision_module, "native_bf16", lambda device: "CPU with AMX (amx_bf16)")
    fast = Encoder(model, precision="auto")
    assert fast.precision == "bf16" and "amx_bf16" in fast.arithmetic["why"]
    assert Encoder(model, precision="fp32").arithmetic == {"precision": "fp32", "asked": "fp32", "why": "asked for"}
    with pytest.raises(ValueError, match="precision must be one of"):
        Encoder(model, precision="int8")
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        np.testing.assert_allclose(fast._fn(x).numpy(), model.embed(x, torch.bfloat16, precision_module.FP32_BLOCKS).numpy())
