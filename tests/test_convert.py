"""Cellpose checkpoints as Microsnoop encoders: the conversion against the real Cellpose network."""
import numpy as np
import pytest
import torch

from microsnoop_ray.model import load_model
from microsnoop_ray.model.convert import FIRST_LAYER, cellpose_to_microsnoop, is_cellpose_state_dict


@pytest.fixture(scope="module")
def cellpose_file(registry_example):
    return registry_example("scellseg-assets") / "pretrained_models" / "cellpose"


def test_scellseg_and_cellpose3_files_convert_to_the_same_state_dict(cellpose_file):
    from microsnoop_ray.segment.cellpose_backend import convert_cellpose_weights

    raw = torch.load(cellpose_file, map_location="cpu", weights_only=True)
    cp3 = torch.load(convert_cellpose_weights(cellpose_file), map_location="cpu", weights_only=True)
    assert is_cellpose_state_dict(raw) and is_cellpose_state_dict(cp3)
    a, b = cellpose_to_microsnoop(raw), cellpose_to_microsnoop(cp3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # first layer: the first of Cellpose's two input channels is kept
    for k, axis in FIRST_LAYER.items():
        assert a[k].shape[axis] == 1
        np.testing.assert_array_equal(a[k].numpy(), raw["extractor." + k.removeprefix("encoder.")].narrow(axis, 0, 1))
    # every encoder tensor of the network is there; the 3-output head is not
    from microsnoop_ray.model import MicrosnoopUNet
    expected = MicrosnoopUNet().state_dict()
    assert {k for k in expected if k.startswith("encoder.")} <= set(a)
    assert not any(k.startswith("decoder.base_") for k in a) and set(a) <= set(expected)
    with pytest.raises(KeyError, match="not a Cellpose"):
        cellpose_to_microsnoop(expected)


def test_converted_encoder_embeds_as_the_real_cellpose_network(cellpose_file, stardist_nuclei):
    """Our embedding of a one-channel image equals the style vector of Cellpose 3's own CPnet when the
    second input channel's first-layer weights are zeroed (then that channel cannot contribute)."""
    from cellpose.resnet_torch import CPnet

    from microsnoop_ray.model.preprocess import preprocess
    from microsnoop_ray.segment.cellpose_backend import convert_cellpose_weights

    model = load_model(f"cellpose:{cellpose_file}")
    assert model.model_card.model_id.startswith("cellpose-cellpose-") and not model.has_decoder
    assert "first layer reduced" in model.model_card.notes
    image, _ = stardist_nuclei
    x = torch.from_numpy(preprocess(image[None, 100:300, 100:300].astype(np.float32)))[:, None]  # (1, 1, 224, 224)
    with torch.no_grad():
        ours = model.embed(x)

    net = CPnet([2, 32, 64, 128, 256], 3, sz=3)
    net.load_model(str(convert_cellpose_weights(cellpose_file)), device=torch.device("cpu"))
    net.eval()
    with torch.no_grad():
        for conv in (net.downsample.down.res_down_0.conv.conv_0[2], net.downsample.down.res_down_0.proj[1]):
            conv.weight[:, 1] = 0.0
        _, style, *_ = net(torch.cat([x, torch.randn_like(x)], dim=1))
    np.testing.assert_allclose(ours.numpy(), style.numpy(), atol=1e-5)


def test_bad_cellpose_files_are_named(tmp_path):
    from microsnoop_ray.errors import WeightsError

    f = tmp_path / "not_cellpose.pt"
    torch.save({"a.weight": torch.zeros(2)}, f)
    with pytest.raises(WeightsError, match="not_cellpose.pt.*not a Cellpose state dict"):
        load_model(f"cellpose:{f}")
    with pytest.raises(WeightsError, match="does not exist"):
        load_model(f"cellpose:{tmp_path / 'missing.pt'}")


def test_skip_modes_change_pretraining_only():
    from microsnoop_ray.model import MicrosnoopUNet

    torch.manual_seed(0)
    net = MicrosnoopUNet().eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        levels = net.encoder(x)
        from microsnoop_ray.model.unet import style_vector
        dropped = net.decoder([torch.zeros_like(t) for t in levels[:-1]] + [levels[-1]], style_vector(levels[-1]))
        np.testing.assert_allclose(net(x, skips="drop").numpy(), dropped.numpy(), atol=1e-6)
        assert not torch.allclose(net(x, skips="drop"), net(x))
        assert not torch.allclose(net(x, skips="noise"), net(x))
        np.testing.assert_allclose(net(x, skips="keep").numpy(), net(x).numpy())
    with pytest.raises(ValueError, match="skips must be"):
        net(x, skips="sideways")


def test_learning_rate_rules_scale_from_batch_16():
    from microsnoop_ray.train.config import TrainConfig

    base = {"sources": [{"kind": "folder", "path": "."}], "lr": 1e-3}
    assert TrainConfig.from_mapping({**base, "batch_size": 256}).base_lr == 1e-3
    assert TrainConfig.from_mapping({**base, "batch_size": 256, "lr_rule": "linear"}).base_lr == pytest.approx(1.6e-2)
    assert TrainConfig.from_mapping({**base, "batch_size": 64, "lr_rule": "sqrt"}).base_lr == pytest.approx(2e-3)
    for bad in ({"lr_rule": "cubic"}, {"skips": "maybe"}, {"amp_dtype": "int8"}):
        with pytest.raises(ValueError):
            TrainConfig.from_mapping({**base, **bad})
