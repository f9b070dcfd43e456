"""One handler per layer type, in a registry; normalisations over channels are refused, and why."""
import pytest
import torch
from torch import nn

import nas_split as ns
from nas_split.surgery import NewChannels, add_channels, handler_for, register_handler
from nas_split.surgery.handlers import BatchNormHandler, ConvHandler, LinearHandler


def test_handlers_are_found_by_the_most_specific_registered_type():
    class MyConv(nn.Conv2d):
        pass

    assert isinstance(handler_for(MyConv(2, 3, 1)), ConvHandler)
    assert isinstance(handler_for(nn.Conv1d(2, 3, 1)), ConvHandler)
    assert isinstance(handler_for(nn.Linear(2, 3)), LinearHandler)
    assert isinstance(handler_for(nn.BatchNorm1d(3)), BatchNormHandler)
    assert handler_for(nn.LayerNorm(3)) is None and handler_for(nn.ReLU()) is None
    assert handler_for(nn.Conv2d(4, 4, 3, groups=4)).kind(nn.Conv2d(4, 4, 3, groups=4)) == "depthwise"
    assert handler_for(nn.Conv2d(4, 8, 3, groups=2)).kind(nn.Conv2d(4, 8, 3, groups=2)) == "grouped"


def test_a_registered_handler_changes_what_surgery_does():
    class ZeroGammaBN(nn.BatchNorm2d):  # a user's norm whose new channels start switched off
        pass

    @register_handler(ZeroGammaBN)
    class ZeroGammaHandler(BatchNormHandler):
        def fresh(self, m, attr, like):
            return torch.zeros_like(like) if attr == "weight" else super().fresh(m, attr, like)

    def net(norm):
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm(4), nn.ReLU(), nn.Conv2d(4, 2, 1))

    x = torch.randn(2, 3, 6, 6)
    for norm, gamma in ((nn.BatchNorm2d, 1.0), (ZeroGammaBN, 0.0)):
        model = net(norm).eval()
        with torch.no_grad():
            ref = model(x)
        add_channels(model, x, {"0": NewChannels(2)})
        assert model[1].weight.shape == (6,) and model[1].weight[-2:].tolist() == [gamma, gamma]
        with torch.no_grad():  # zero fan-out: the function is kept either way
            assert torch.allclose(model(x), ref, atol=1e-6)


@pytest.mark.parametrize("norm, message", [(lambda c: nn.LayerNorm(c), "LayerNorm"),
                                           (lambda c: nn.GroupNorm(2, c), "GroupNorm")])
def test_normalisations_over_channels_are_refused_by_name(norm, message):
    if message == "LayerNorm":
        model = nn.Sequential(nn.Linear(8, 6), norm(6), nn.ReLU(), nn.Linear(6, 3))
        x = torch.randn(4, 8)
    else:
        model = nn.Sequential(nn.Conv2d(3, 6, 3), norm(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(6, 3))
        x = torch.randn(4, 3, 8, 8)
    assert ns.growable_layers(model, x) == []
    with pytest.raises(ns.NotGrowableError, match=f"a {message} normalises over them"):
        ns.surgery.CouplingGraph(model, x).group("0")


def test_why_no_split_can_keep_a_layer_norm_over_channels():
    """Duplicating a channel (a split at ε = 0 gives two equal copies) changes the mean and variance the norm takes
    over the channels, for every input: so no choice of copy weights downstream restores the output."""
    torch.manual_seed(0)
    h = torch.randn(5, 6)  # pre-norm activations of 6 channels
    dup = torch.cat([h, h[:, :1]], dim=1)  # channel 0 split into two equal copies
    ln = nn.functional.layer_norm
    before, after = ln(h, (6,)), ln(dup, (7,))
    assert not torch.allclose(after[:, 1:6], before[:, 1:6], atol=1e-3)  # the untouched channels change too
    mean_shift = (dup.mean(1) - h.mean(1)).abs()
    assert torch.allclose(mean_shift, (h[:, 0] - h.mean(1)).abs() / 7, atol=1e-6)  # by (h_0 - μ)/(C+1)
