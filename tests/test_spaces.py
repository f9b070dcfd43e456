"""Every registered backbone builds and runs on its declared input; seed widths and strides are as configured."""
import pytest
import timm
import torch
from torch import nn

import search_spaces
from search_spaces._registry import _SPACES
from search_spaces.mobilenet import MBV1_STAGES, MBV2_STAGES, base_widths, small_input_stride


def _input(name, batch=2, size=16):
    kind = search_spaces.info(name).input_kind
    return torch.randn(batch, 3, size, size) if kind == "image" else torch.randn(batch, 3, 64)


@pytest.mark.parametrize("name", sorted(_SPACES))
def test_registered_space_builds_and_runs(name):
    size = 8 if name.startswith(("mlp", "test_mlp")) else 16
    model = search_spaces.create(name, num_classes=7, in_chans=3, input_size=size).eval()
    with torch.no_grad():
        out = model(_input(name, size=size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", search_spaces.list("mobilenetv[12]_*"))
def test_timm_names_build_and_run(name):
    model = search_spaces.create(name, num_classes=5, in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize("ours, theirs, mult", [("mobilenetv1", "mobilenetv1_100", 1.0),
                                                ("mobilenetv2", "mobilenetv2_100", 1.0),
                                                ("mobilenetv2", "mobilenetv2_050", 0.5)])
def test_generic_builders_reproduce_timm(ours, theirs, mult):
    a = search_spaces.create(ours, num_classes=1000, in_chans=3, width_mult=mult)
    b = timm.create_model(theirs)
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]


@pytest.mark.parametrize("img, side", [(8, 4), (16, 4), (28, 7), (32, 4)])
def test_small_input_variants_keep_a_spatial_map(img, side):
    m = search_spaces.create("mobilenetv2_cifar_050", num_classes=10, in_chans=1, input_size=img).eval()
    feats = m.forward_features(torch.randn(1, 1, img, img))
    assert feats.shape[-1] == side and side > 1
    assert img // small_input_stride(img) == side
    assert m.feature_info[-1]["reduction"] == small_input_stride(img)


def test_explicit_widths_are_used():
    widths = [8, 12, 16, 16, 24, 24] + [32] * 6 + [40, 48]
    m = search_spaces.create("mobilenetv1_cifar_100", num_classes=10, in_chans=3, widths=widths)
    outs = [m.conv_stem.out_channels] + [b.conv_pw.out_channels for stage in m.blocks for b in stage]
    assert outs == widths and m.classifier.in_features == 48
    n = len(base_widths(MBV2_STAGES, 1280))
    assert n == 19 and len(base_widths(MBV1_STAGES, None)) == 14
    with pytest.raises(ValueError, match="widths must list 14"):
        search_spaces.create("mobilenetv1_cifar_100", widths=[8, 8])


def test_pointnet_widths_and_width_mult():
    m = search_spaces.create("pointnet", num_classes=4, in_chans=3, width_mult=0.25)
    convs = [c.out_channels for c in m.modules() if isinstance(c, nn.Conv1d)]
    assert convs == [16, 16, 16, 32, 256]
    m = search_spaces.create("pointnet_lite", num_classes=4, in_chans=3, widths=[8, 8, 8, 8, 8, 4, 4])
    assert [c.out_channels for c in m.modules() if isinstance(c, nn.Conv1d)] == [8] * 5


def test_user_space_registration():
    @search_spaces.register("user_tiny_cnn", description="a user's space")
    def user_tiny_cnn(num_classes, in_chans, input_size=None, width=4):
        return nn.Sequential(nn.Conv2d(in_chans, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(width, num_classes))

    try:
        assert "user_tiny_cnn" in search_spaces.list()
        m = search_spaces.create("user_tiny_cnn", num_classes=3, in_chans=2, width=6)
        assert m[0].out_channels == 6 and m(torch.randn(1, 2, 5, 5)).shape == (1, 3)
    finally:
        _SPACES.pop("user_tiny_cnn")


def test_unknown_space_suggests():
    with pytest.raises(search_spaces.UnknownSpaceError, match="did you mean"):
        search_spaces.create("pointnet_lit")


def test_registered_with_timm_too():
    m = timm.create_model("test_mobilenetv1", num_classes=3)
    assert m(torch.randn(1, 3, 16, 16)).shape == (1, 3)
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("mobilenetv1_cifar_050", pretrained=True)
