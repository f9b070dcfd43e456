"""The second-order prediction ``ΔL = (ε²/2) G`` against the measured loss change of a real split (float64, eval
mode, smooth activations so that σ'' is the true curvature, random batch-norm statistics so eval mode is not the
identity), where the theory's assumption holds: the split neuron's activation feeds its consumer linearly.

* a conv chain (conv -> BN -> SiLU -> conv): the relative error is below 1e-3 at ε = 1e-4;
* PointNet's max-pool over points between the split layer and its consumer: the gradient reaches only the
  argmax point, where σ'' is applied, so the prediction holds while neither copy's argmax moves: below 1e-3 at
  ε = 1e-4.  The range is narrow: at growth's default ε = 1e-2 an argmax switches for most of the top
  feature neurons here and the measured change is off by factors of 4 to 20 (checked below).

Not checked here because the analysis does not hold there yet (issue 14): a depthwise conv + norm + activation
between the split layer and its consumer (MobileNet blocks, MobileNetV2's expansion inside a residual block),
whose activation's curvature τ'' adds ``Σ_q ∂L/∂y_q τ''(u_q) ∇u_q ∇u_qᵀ`` to the splitting matrix.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nas_split import Grower
from nas_split.surgery import split

EPS = 1e-4
TOL = 1e-3


class ConvChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.a1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU()
        self.c2, self.b2, self.a2 = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.SiLU()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = self.a1(self.b1(self.c1(x)))
        return self.fc(self.a2(self.b2(self.c2(h))).mean((2, 3)))


class MaxPoolPointNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.a1 = nn.Conv1d(3, 8, 1), nn.BatchNorm1d(8), nn.SiLU()
        self.c2, self.b2, self.a2 = nn.Conv1d(8, 12, 1), nn.BatchNorm1d(12), nn.SiLU()
        self.fc1, self.a3, self.fc = nn.Linear(12, 8), nn.SiLU(), nn.Linear(8, 4)

    def forward(self, x):
        h = self.a2(self.b2(self.c2(self.a1(self.b1(self.c1(x))))))
        return self.fc(self.a3(self.fc1(h.max(2).values)))  # max over points


def _with_random_norms(model_cls) -> nn.Module:
    """The model in float64, eval mode, with random batch-norm statistics and affines (eval mode is then not the
    identity)."""
    torch.manual_seed(0)
    model = model_cls().double()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("model_cls, shape, layers", [
    (ConvChain, (16, 3, 6, 6), ["c1"]),
    (MaxPoolPointNet, (16, 3, 20), ["c2", "c1"]),
])
def test_second_order_prediction_holds_where_the_consumer_is_linear(model_cls, shape, layers):
    model = _with_random_norms(model_cls)
    x, y = torch.randn(*shape, dtype=torch.double), torch.randint(0, 4, (shape[0],))
    base = F.cross_entropy(model(x), y).item()
    g = Grower(model, x, "s2d", layers=layers)
    cands = sorted(g.candidates(g.analyze([(x, y)])), key=lambda s: s.gain)
    assert len(cands) >= 8
    for s in cands[:6]:  # the most negative gains: the ones growth splits
        m = copy.deepcopy(model)
        split(m, x, {s.layer: [(s.channel, s.scheme)]}, eps=EPS)
        measured = F.cross_entropy(m(x), y).item() - base
        assert measured == pytest.approx(s.predicted_change(EPS), rel=TOL), (s.layer, s.channel)


def test_through_a_max_pool_the_prediction_fails_once_an_argmax_moves():
    model = _with_random_norms(MaxPoolPointNet)
    x, y = torch.randn(16, 3, 20, dtype=torch.double), torch.randint(0, 4, (16,))
    base = F.cross_entropy(model(x), y).item()
    g = Grower(model, x, "s2d", layers=["c2"])
    ratios = []
    for s in sorted(g.candidates(g.analyze([(x, y)])), key=lambda s: s.gain)[:5]:
        m = copy.deepcopy(model)
        split(m, x, {s.layer: [(s.channel, s.scheme)]}, eps=1e-2)
        ratios.append((F.cross_entropy(m(x), y).item() - base) / s.predicted_change(1e-2))
    assert sum(abs(r - 1) > 1 for r in ratios) >= 3, ratios
