import numpy as np
import pytest
import torch

from microsnoop_ray import WeightsError, embed, load_model, save_model
from microsnoop_ray.model import ModelCard, default_weights_path, weights_hash
from reference import embed_reference


def test_published_checkpoint_loads_and_names_its_training_data(published_ckpt, published_sd):
    model = load_model(published_ckpt)
    assert not model.training
    assert model.has_decoder
    sd = model.state_dict()
    for k, v in published_sd.items():
        assert torch.equal(sd[k.removeprefix("module.")], v.float()), k
    card = model.model_card
    assert card.training_data == "microsnoop"
    assert card.mask_ratio == 0.25 and card.input_size == 224
    assert card.model_id.startswith("microsnoop-microsnoop-") and card.model_id.endswith(card.weights_sha256[:8])


def test_plain_state_dict_gives_same_embeddings(tmp_path, published_ckpt, published_sd, mlcp_cells):
    plain = tmp_path / "plain.pt"
    torch.save({k.removeprefix("module."): v for k, v in published_sd.items()}, plain)
    images = mlcp_cells[0][:3]
    a = embed(images, load_model(published_ckpt))
    b = embed(images, load_model(plain))
    np.testing.assert_array_equal(a, b)


def test_own_format_round_trip_with_card_fp16_and_encoder_only(tmp_path, published_ckpt, mlcp_cells):
    model = load_model(published_ckpt)
    card = save_model(model, tmp_path / "full.pt",
                      ModelCard(model_id="microsnoop-test-{hash}", weights_sha256="", training_data="unit test",
                                epochs=1, mask_ratio=0.25, input_size=224))
    again = load_model(tmp_path / "full.pt")
    assert again.model_card.model_id == f"microsnoop-test-{card.weights_sha256[:8]}"
    assert again.model_card.weights_sha256 == weights_hash(again.state_dict())
    images = mlcp_cells[0][:2]
    np.testing.assert_array_equal(embed(images, model), embed(images, again))

    save_model(model, tmp_path / "half_enc.pt", half=True, encoder_only=True)
    small = load_model(tmp_path / "half_enc.pt")
    assert not small.has_decoder
    assert (tmp_path / "half_enc.pt").stat().st_size < 6_500_000
    np.testing.assert_allclose(embed(images, small), embed(images, model), atol=5e-3)


def test_tampered_card_hash_is_refused(tmp_path, published_ckpt):
    save_model(load_model(published_ckpt), tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["state_dict"]["encoder.downsample.down.res_down_0.proj.1.bias"] += 1
    torch.save(payload, tmp_path / "m.pt")
    with pytest.raises(WeightsError, match="does not match its model card"):
        load_model(tmp_path / "m.pt")


@pytest.mark.parametrize("kind", ["missing", "garbage", "pickle", "not_dict", "wrong_keys", "wrong_shape", "folder"])
def test_bad_weights_files_name_the_file_and_problem(tmp_path, published_sd, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "garbage":
        path.write_bytes(b"this is not a checkpoint" * 10)
    elif kind == "pickle":
        import pickle

        class Evil:
            def __reduce__(self):
                return (print, ("executed",))
        path.write_bytes(pickle.dumps({"model": Evil()}))
    elif kind == "not_dict":
        torch.save(torch.zeros(3), path)
    elif kind == "wrong_keys":
        torch.save({"model": {"foo.weight": torch.zeros(3)}}, path)
    elif kind == "wrong_shape":
        sd = dict(published_sd)
        sd["module.decoder.base_conv.bias"] = torch.zeros(2)
        torch.save({"model": sd}, path)
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(WeightsError) as info:
        load_model(path)
    assert str(path) in str(info.value)
    assert info.value.problem


def test_no_default_weights_is_said_clearly(tmp_path, monkeypatch):
    """An installation without the weights file (e.g. a stripped build) says so and how to go on."""
    from microsnoop_ray.model import load as load_module

    monkeypatch.setattr(load_module, "_WEIGHTS_DIR", tmp_path)
    assert default_weights_path() is None
    with pytest.raises(WeightsError, match="no default weights are shipped"):
        load_model(None)


def test_published_checkpoint_embeddings_match_independent_pipeline(published_ckpt, published_sd, mlcp_cells):
    images = mlcp_cells[0][:4]
    # --input-size 224 is the published contract, one flag away from the default
    ours = embed(images, load_model(published_ckpt), batch_size=5, precision="fp32", input_size=224)
    ref = embed_reference(images, published_sd)
    assert ours.shape == (4, 768) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_default_input_size_pads_mlcp_cells_to_64(published_ckpt, published_sd, mlcp_cells):
    """40-px cells are padded to 64 by default (the input-size study's rule), and that is the
    reference pipeline at 64, not at 224."""
    images = mlcp_cells[0][:3]
    assert max(images.shape[-2:]) == 40
    ours = embed(images, load_model(published_ckpt), precision="fp32")
    np.testing.assert_allclose(ours, embed_reference(images, published_sd, size=64), atol=1e-5)
    assert np.abs(ours - embed_reference(images, published_sd)).max() > 1e-2
