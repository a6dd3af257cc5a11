import torch

from microsnoop_ray.model import MicrosnoopUNet, count_parameters
from reference import encoder_levels, published_state_dict, reconstruct


def test_parameter_counts_match_the_published_network():
    net = MicrosnoopUNet()
    assert count_parameters(net) == 6_600_453
    assert count_parameters(net.encoder) == 2_786_660


def test_state_dict_layout_is_the_published_one():
    ours = MicrosnoopUNet().state_dict()
    published = {k.removeprefix("module."): v for k, v in published_state_dict().items()}
    assert len(ours) == 311
    assert set(ours) == set(published)
    for k, v in ours.items():
        assert tuple(v.shape) == tuple(published[k].shape), k


def test_level_shapes_at_224():
    net = MicrosnoopUNet().eval()
    with torch.no_grad():
        levels = net.encoder(torch.zeros(1, 1, 224, 224))
    assert [tuple(t.shape[1:]) for t in levels] == [(32, 224, 224), (64, 112, 112), (128, 56, 56), (256, 28, 28)]


def test_forward_matches_independent_functional_network():
    sd = published_state_dict(seed=3, prefix="")
    net = MicrosnoopUNet().eval()
    net.load_state_dict(sd)
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = net(x).double()
        ref = reconstruct(x.double(), sd)
        emb = net.embed(x).double()
        ref_levels = encoder_levels(x.double(), sd)
    assert ours.shape == (2, 1, 64, 64)
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    g = ref_levels[-1].mean(dim=(2, 3))
    assert torch.allclose(emb, g / g.norm(dim=1, keepdim=True), atol=1e-5)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2, dtype=torch.float64), atol=1e-6)
