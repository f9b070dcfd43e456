"""MACs, energy and memory accounting against hand-computed values."""
import pytest
import torch
from torch import nn

from nas_split.cost import EnergyModel, count_macs, measure_cost


@pytest.mark.parametrize("layer, x, expected", [
    # dense conv: Cout * Cin * k*k * Hout*Wout
    (nn.Conv2d(3, 8, 3, padding=1), torch.randn(1, 3, 10, 10), 8 * 3 * 9 * 10 * 10),
    # strided dense conv: 10x10 -> 5x5
    (nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.randn(1, 3, 10, 10), 8 * 3 * 9 * 5 * 5),
    # depthwise: Cout * (Cin/groups = 1) * k*k * Hout*Wout
    (nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.randn(1, 8, 10, 10), 8 * 1 * 9 * 10 * 10),
    # grouped, groups=2, no padding: 6x6 -> 4x4
    (nn.Conv2d(8, 4, 3, groups=2), torch.randn(1, 8, 6, 6), 4 * 4 * 9 * 4 * 4),
    # Conv1d: 10 -> 8 positions
    (nn.Conv1d(4, 6, 3), torch.randn(1, 4, 10), 6 * 4 * 3 * 8),
    # pointwise Conv1d as in PointNet
    (nn.Conv1d(3, 64, 1), torch.randn(1, 3, 128), 64 * 3 * 128),
    (nn.Linear(7, 5), torch.randn(1, 7), 35),
])
def test_macs_match_hand_computed(layer, x, expected):
    total, per_layer = count_macs(nn.Sequential(layer), x)
    assert total == expected
    assert per_layer == {"0": expected}


def test_macs_are_per_sample():
    net = nn.Sequential(nn.Linear(7, 5))
    assert count_macs(net, torch.randn(16, 7))[0] == 35


def test_mobilenetv2_100_reference_macs():
    import timm

    total, _ = count_macs(timm.create_model("mobilenetv2_100"), torch.randn(1, 3, 224, 224))
    assert total == 300_774_272  # 300.77 M, the reference convention (conv + linear MACs)


def test_energy_is_sum_of_layer_terms_and_hand_value():
    em = EnergyModel()
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    r = measure_cost(net, torch.randn(1, 2, 5, 5), em, latency=False)
    assert r.energy_uj == pytest.approx(sum(lc.energy_pj for lc in r.layers) / 1e6, rel=1e-12)
    conv, lin = {lc.name: lc for lc in r.layers}["0"], {lc.name: lc for lc in r.layers}["4"]
    conv_macs = 4 * 2 * 9 * 25
    conv_bytes = 4 * (4 * 2 * 9) + 4 * (2 * 25) + 4 * (4 * 25)  # weights, input, output (float32)
    assert conv.macs == conv_macs
    assert conv.energy_pj == pytest.approx(conv_macs * 4.6 + conv_bytes * 160.0)
    lin_bytes = 4 * (100 * 3 + 3) + 4 * 100 + 4 * 3
    assert lin.energy_pj == pytest.approx(300 * 4.6 + lin_bytes * 160.0)
    assert r.macs == conv_macs + 300
    assert r.params == 4 * 2 * 9 + 8 + 303


def test_sram_model_and_functional_ops_charged():
    class Bmm(nn.Module):
        def forward(self, x):
            return torch.bmm(x, x.transpose(1, 2))

    r = measure_cost(Bmm(), torch.randn(1, 3, 4), EnergyModel.sram(), latency=False)
    assert r.macs == 3 * 3 * 4
    assert [lc.name for lc in r.layers] == ["(other)"]
    assert r.energy_uj * 1e6 == pytest.approx(36 * 4.6)


def test_peak_activation_and_latency():
    net = nn.Sequential(nn.Linear(10, 1000), nn.ReLU(), nn.Linear(1000, 2))
    r = measure_cost(net, torch.randn(3, 10))
    assert r.peak_activation_bytes == 4 * (1000 + 1000)  # the ReLU's input + output
    assert r.latency_ms is not None and r.latency_ms > 0
    assert set(r.provenance) >= {"macs", "energy_uj", "latency_ms"}
