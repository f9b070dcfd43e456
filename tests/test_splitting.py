"""Splitting matrices against autograd, predicted vs measured loss changes, fast vs exact, S3D vs S2D, the LP."""
import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nas_split as ns
from nas_split.grower import Grower
from nas_split.growth.channel_cost import channel_costs, macs_after_growth, prefix_within_macs
from nas_split.growth.neurons import find_neurons
from nas_split.splitting.analysis import exact_spectrum, fast_spectrum, splitting_matrices
from nas_split.splitting.schemes import s2d_split, s3d_splits
from nas_split.splitting.selection import Candidate, select_lp, select_ratio
from nas_split.surgery import CouplingGraph

ACTS = {"relu": (nn.ReLU, lambda u: F.softplus(u, beta=3.0)), "silu": (nn.SiLU, F.silu), "tanh": (nn.Tanh, torch.tanh)}


def _randomise_bn(model):
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(m.num_features, generator=g))


def tiny(kind, act):
    a = ACTS[act][0]
    if kind == "conv2d":
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), a(),
                            nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.BatchNorm2d(5), a(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
        x = torch.randn(6, 3, 6, 6)
    elif kind == "separable":
        net = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), a(), nn.Conv2d(6, 6, 3, padding=1, groups=6),
                            nn.BatchNorm2d(6), a(), nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5), a(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
        x = torch.randn(6, 3, 5, 5)
    elif kind == "conv1d":
        net = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4), a(), nn.Conv1d(4, 5, 1),
                            nn.BatchNorm1d(5), a(), nn.AdaptiveMaxPool1d(1), nn.Flatten(), nn.Linear(5, 3))
        x = torch.randn(6, 3, 9)
    else:
        net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), a(), nn.Linear(5, 4), nn.BatchNorm1d(4), a(),
                            nn.Linear(4, 3))
        x = torch.randn(8, 6)
    net = net.double().eval()
    _randomise_bn(net)
    return net, x.double(), torch.arange(len(x)) % 3


def _second_derivative(fn, u):
    """``fn''(u)`` elementwise by autograd."""
    u = u.detach().requires_grad_(True)
    (d1,) = torch.autograd.grad(fn(u).sum(), u, create_graph=True)
    return torch.autograd.grad(d1.sum(), u)[0]


def brute_force_S(net, x, y, idx, act):
    """S_o = Hessian over θ_o of Σ g · σ(a (θ_o·p) + b), g = ∂L/∂σ from autograd (independent of nas_split).

    When a depthwise conv -> BN -> activation τ follows (``separable``, idx 0), add the tail's curvature
    ``Σ_q ∂L/∂y_q τ''(e_q) J_qᵀ J_q`` with ``J = ∂e/∂θ_o`` by autograd through the real network function."""
    layer, bn = net[idx], net[idx + 1]
    smooth = ACTS[act][1]
    tail = idx + 3 < len(net) and isinstance(net[idx + 3], nn.Conv2d) and net[idx + 3].groups > 1
    store = {}
    h1 = layer.register_forward_hook(lambda m, i, o: store.__setitem__("x", i[0]))
    h2 = net[idx + 2].register_forward_hook(lambda m, i, o: store.__setitem__("sigma", o))
    hooks = [h1, h2]
    if tail:
        hooks.append(net[idx + 4].register_forward_hook(lambda m, i, o: store.__setitem__("e", o)))
        hooks.append(net[idx + 5].register_forward_hook(lambda m, i, o: store.__setitem__("y", o)))
    loss = F.cross_entropy(net(x), y)
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(loss, [store["sigma"], store["y"]] if tail else [store["sigma"]])
    g = grads[0].detach()
    a = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    if tail:
        dw, bn2 = net[idx + 3], net[idx + 4]
        s2 = bn2.weight.detach() / torch.sqrt(bn2.running_var + bn2.eps)
    out = []
    for o in range(layer.weight.shape[0]):
        def z_of(theta, o=o):
            w = theta.view(1, *layer.weight.shape[1:])
            if isinstance(layer, nn.Linear):
                z = store["x"] @ w.T
            elif isinstance(layer, nn.Conv1d):
                z = F.conv1d(store["x"], w, None, layer.stride, layer.padding, layer.dilation)
            else:
                z = F.conv2d(store["x"], w, None, layer.stride, layer.padding, layer.dilation)
            z = z[:, 0] + (layer.bias[o].detach() if layer.bias is not None else 0)
            return a[o] * (z - bn.running_mean[o]) + bn.bias[o].detach()

        def f(theta, o=o):
            return (g[:, o] * smooth(z_of(theta, o))).sum()

        theta0 = layer.weight[o].detach().flatten()
        hess = torch.autograd.functional.hessian(f, theta0)
        if tail:
            def e_of(theta, o=o):
                sig = net[idx + 2](z_of(theta, o).unsqueeze(1))
                d = F.conv2d(sig, dw.weight[o:o + 1].detach(), dw.bias[o:o + 1].detach(), dw.stride, dw.padding)
                return (s2[o] * (d[:, 0] - bn2.running_mean[o]) + bn2.bias[o].detach()).flatten()

            gy = grads[1].detach()[:, o].flatten()
            jac = torch.autograd.functional.jacobian(e_of, theta0)                      # (N·Q, D)
            tau2 = _second_derivative(smooth, store["e"][:, o].flatten())
            hess = hess + jac.T @ (gy[:, None] * tau2[:, None] * jac)
        out.append(hess)
    return torch.stack(out)


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("kind, idx", [("conv2d", 0), ("conv2d", 3), ("separable", 0), ("separable", 6),
                                       ("conv1d", 0), ("conv1d", 3), ("linear", 0), ("linear", 3)])
def test_exact_S_equals_autograd_hessian(kind, idx, act):
    torch.manual_seed(0)
    net, x, y = tiny(kind, act)
    name = str(idx)
    neurons = find_neurons(net, x, [name])
    assert neurons[name].norm is net[idx + 1] and neurons[name].kind == act
    s = splitting_matrices(net, [(x, y)], neurons, F.cross_entropy)[name]
    ref = brute_force_S(net, x, y, idx, act)
    assert ref.abs().max() > 0
    assert (s - ref).norm() <= 1e-5 * ref.norm()


class _TwoBranches(nn.Module):
    """``a1`` on the input; ``a2`` on a learned constant (``route="constant"``), on the input (``"input"``), or on
    the constant for batches of more than 4 samples only (``"by-batch"``); ``in_place``: ``forward`` scales its
    input in place first."""

    def __init__(self, route: str = "constant", in_place: bool = False):
        super().__init__()
        self.route, self.in_place = route, in_place
        self.l1, self.a1 = nn.Linear(6, 5), nn.Tanh()
        self.const = nn.Parameter(torch.randn(1, 3))
        self.l2, self.a2 = nn.Linear(3, 5), nn.Tanh()
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        if self.in_place:
            x.mul_(1.5)
        on_const = self.route == "constant" or (self.route == "by-batch" and len(x) > 4)
        return self.head(self.a1(self.l1(x)) * self.a2(self.l2(self.const if on_const else x[:, :3])))


class _Tokens(nn.Module):
    """An integer input (token ids): there is no input gradient to ask for."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.l1, self.a1 = nn.Linear(6, 5), nn.Tanh()
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.a1(self.l1(self.emb(x))).mean(1))


def _brute_force_linear_tanh(net, x, y, layer, act):
    """S_o = Hessian over θ_o of Σ_r g_ro tanh(θ_o·p_r + b_o) over every row r of the layer's input (autograd)."""
    store = {}
    hooks = [layer.register_forward_hook(lambda m, i, o: store.__setitem__("p", i[0])),
             act.register_forward_hook(lambda m, i, o: store.__setitem__("sigma", o))]
    loss = F.cross_entropy(net(x.clone()), y)
    for h in hooks:
        h.remove()
    (g,) = torch.autograd.grad(loss, store["sigma"])
    p, g = store["p"].detach().reshape(-1, layer.in_features), g.reshape(-1, layer.out_features)
    return torch.stack([torch.autograd.functional.hessian(
        lambda t, o=o: (g[:, o] * torch.tanh(p @ t + layer.bias[o].detach())).sum(), layer.weight[o].detach())
        for o in range(layer.out_features)])


@pytest.mark.parametrize("model", ["constant-branch", "by-batch", "in-place", "tokens"])
def test_every_model_the_input_gradient_shortcut_cannot_serve_is_analysed_exactly(model):
    # the analysis' backward asks for the input's gradient only; these need the parameters' gradients: an activation
    # on a learned constant (from the first batch on, or from the second batch on), an integer input; and a model
    # that scales its input in place must not meet a leaf that requires grad
    torch.manual_seed(0)
    net = _Tokens() if model == "tokens" else _TwoBranches(
        {"by-batch": "by-batch", "in-place": "input"}.get(model, "constant"), in_place=model == "in-place")
    net = net.double()
    xs = [torch.randint(0, 10, (8, 4))] * 2 if model == "tokens" else [torch.randn(n, 6).double() for n in (4, 8)]
    batches = [(x, torch.arange(len(x)) % 3) for x in xs]
    names = ["l1"] if model == "tokens" else ["l1", "l2"]
    s = splitting_matrices(net, [(x.clone(), y) for x, y in batches], find_neurons(net, xs[0].clone(), names),
                           F.cross_entropy)
    for name in names:  # the batch mean over samples
        ref = sum(len(x) * _brute_force_linear_tanh(net, x, y, getattr(net, name), getattr(net, "a" + name[1]))
                  for x, y in batches) / sum(len(x) for x in xs)
        assert ref.abs().max() > 0
        assert (s[name] - ref).norm() <= 1e-10 * ref.norm()


@pytest.mark.parametrize("model", ["input", "tokens"])
def test_an_analysis_pass_costs_two_forwards_by_flop_count_and_the_pass_counter_says_so(model):
    from torch.utils.flop_counter import FlopCounterMode

    from nas_split.cost import PassCounter, count_macs
    from nas_split.splitting.analysis import _passes

    net = (_Tokens() if model == "tokens" else _TwoBranches("input")).double()
    x = torch.randint(0, 10, (8, 4)) if model == "tokens" else torch.randn(8, 6).double()
    neurons = find_neurons(net, x, ["l1"])
    per_sample = count_macs(net, x)[0]
    assert per_sample == (4 * 30 + 15 if model == "tokens" else 30 + 15 + 15)  # hand count: rows x in x out
    with PassCounter(net) as passes, FlopCounterMode(display=False) as fc:
        next(_passes(net, [(x, torch.arange(8) % 3)], neurons, F.cross_entropy, 1))
    # a float input: forward + the input gradients (no weight gradients) = 2 forwards; token ids: weights' too
    want = (3 if model == "tokens" else 2) * 8 * per_sample
    assert fc.get_total_flops() // 2 == want
    assert passes.macs(per_sample) == want


def test_exact_S_is_averaged_over_batches():
    net, x, y = tiny("linear", "tanh")
    neurons = find_neurons(net, x, ["0"])
    whole = splitting_matrices(net, [(x, y)], neurons, F.cross_entropy)["0"]
    halves = splitting_matrices(net, [(x[:4], y[:4]), (x[4:], y[4:])], neurons, F.cross_entropy)["0"]
    # the batch estimate uses each batch's mean loss; the average over equal batches is the full-batch matrix
    assert torch.allclose(whole, halves, atol=1e-12)


def _loss(net, x, y):
    with torch.no_grad():
        return F.cross_entropy(net(x), y).item()


@pytest.mark.parametrize("kind", ["s2d", "s3d-min", "s3d-max", "s3d-both"])
@pytest.mark.parametrize("arch", ["linear", "conv2d"])
def test_predicted_loss_change_matches_measured(kind, arch):
    torch.manual_seed(1)
    net, x, y = tiny(arch, "tanh")
    layer = "3"
    neurons = find_neurons(net, x, [layer])
    sp = exact_spectrum(net, [(x, y)], neurons, F.cross_entropy)[layer]
    eps = 1e-2
    l0 = _loss(net, x, y)
    if kind == "s2d":
        o = int(torch.argmin(sp.lam_min))
        cand = s2d_split(layer, o, float(sp.lam_min[o]), sp.v_min[o])
        assert cand.gain < 0
    else:
        o = int(torch.argmin(sp.lam_min)) if kind != "s3d-max" else int(torch.argmax(sp.lam_max))
        cand = next(c for c in s3d_splits(layer, o, float(sp.lam_min[o]), sp.v_min[o], float(sp.lam_max[o]),
                                          sp.v_max[o], c=3.0) if c.kind == kind)
    trial = copy.deepcopy(net)
    ns.split(trial, x, {layer: [(o, cand.scheme)]}, eps=eps)
    measured = _loss(trial, x, y) - l0
    predicted = cand.predicted_change(eps)
    assert abs(predicted) > 1e-9
    assert measured == pytest.approx(predicted, rel=0.10)


class _MiniMobileNet(nn.Module):
    """MobileNet-style: conv-BN-SiLU stem, two depthwise-separable blocks, pooled classifier."""

    def __init__(self):
        super().__init__()
        layers, c = [nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU()], 8
        for out in (12, 16):
            layers += [nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.SiLU(),
                       nn.Conv2d(c, out, 1, bias=False), nn.BatchNorm2d(out), nn.SiLU()]
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _spearman(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def test_fast_matches_exact_on_mobilenet_style_net():
    from nas_split.data import create_dataset

    torch.manual_seed(0)
    d = create_dataset("digits", seed=0)
    net = _MiniMobileNet()
    _randomise_bn(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x_all, y_all = d.train.tensors
    for _ in range(30):  # a partly trained net, as at a growth round
        opt.zero_grad()
        F.cross_entropy(net(x_all[:256]), y_all[:256]).backward()
        opt.step()
    loader = [(x_all[i:i + 128], y_all[i:i + 128]) for i in range(0, 512, 128)]
    layers = ["features.0", "features.6", "features.12"]
    neurons = find_neurons(net, x_all[:2], layers)
    exact = exact_spectrum(net, loader, neurons, F.cross_entropy)
    fast = fast_spectrum(net, loader, neurons, F.cross_entropy, passes=30, max_batches=None,
                         generator=torch.Generator().manual_seed(0))
    emin = torch.cat([exact[n].lam_min for n in layers])
    fmin = torch.cat([fast[n].lam_min for n in layers])
    emax = torch.cat([exact[n].lam_max for n in layers])
    fmax = torch.cat([fast[n].lam_max for n in layers])
    top = emin.argsort()[:10]
    assert ((fmin[top] - emin[top]).abs() <= 0.05 * emin[top].abs()).all(), (fmin[top], emin[top])
    top = emax.argsort(descending=True)[:10]
    assert ((fmax[top] - emax[top]).abs() <= 0.05 * emax[top].abs()).all(), (fmax[top], emax[top])
    assert _spearman(fmin, emin) >= 0.9 and _spearman(fmax, emax) >= 0.9


def _mse(out, y):
    return F.mse_loss(out.squeeze(-1), y)


def _stable_toy():
    """A tanh net at a splitting-stable point: g = ∂L/∂σ = (f - y) W2 > 0 (outputs above every target, W2 > 0)
    and tanh''(u) > 0 (u < 0 on all inputs), so every S = E[g σ'' x xᵀ] is positive semi-definite."""
    torch.manual_seed(0)
    x = torch.rand(64, 2, dtype=torch.float64) * 2 - 1
    y = torch.sin(3 * x[:, 0]) * 0.5 - 3.0
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.5], [-0.5, 1.0], [0.3, -1.0]]))
        net[0].bias.fill_(-2.0)
        net[2].weight.fill_(0.5)
        net[2].bias.zero_()
    return net, x, y


def test_splitting_stable_toy_s3d_escapes():
    net, x, y = _stable_toy()
    neurons = find_neurons(net, x, ["0"])
    sp = exact_spectrum(net, [(x, y)], neurons, _mse)["0"]
    assert (sp.lam_min >= 0).all() and (sp.lam_max > 0).all()  # splitting-stable, but S != 0
    s2d = Grower(copy.deepcopy(net), x, "s2d", grow_ratio=1.0, eps=0.05, loss_fn=_mse)
    assert s2d.step([(x, y)]).new_neurons == 0  # no descent split exists for S2D
    grown = copy.deepcopy(net)
    rep = Grower(grown, x, "s3d-exact", grow_ratio=2.0, eps=0.05, c=3.0, loss_fn=_mse).step([(x, y)])
    assert rep.new_neurons == 6 and rep.schemes == {"s3d-max": 3}
    with torch.no_grad():
        before, after = _mse(net(x), y).item(), _mse(grown(x), y).item()
    assert rep.predicted_change < 0
    assert after - before == pytest.approx(rep.predicted_change, rel=0.2)  # S3D lowers the loss as predicted


def test_linear_neurons_have_no_splitting_matrix():
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    net.eval()
    x = torch.randn(16, 4, dtype=torch.float64)
    assert find_neurons(net, x, ["0"])["0"].is_linear
    ref = net(x)
    ns.split(net, x, {"0": [0, 1, 2]}, eps=0.5)  # any eps: the copies are averaged linearly
    assert torch.allclose(net(x), ref, atol=1e-12)
    g = Grower(net, x, "s2d")
    assert list(g.neurons()) == ["2"]  # linear layers are never analysed or grown


def test_lp_selection_equals_brute_force_and_respects_budget():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = 8
        gains = rng.normal(size=n) - 0.3
        costs = rng.uniform(0.5, 3.0, size=n)
        layers = [f"l{i % 2}" for i in range(n)]
        cands = [Candidate(s2d_split(layers[i], i, gains[i], torch.zeros(1)), costs[i], "g") for i in range(n)]
        budget = rng.uniform(1.0, 6.0)
        room = {"l0": int(rng.integers(1, 4))}
        chosen, res = select_lp(cands, {"g": budget}, room, threshold=0.99)
        # brute force over the LP's vertices: at most one fractional variable per binding constraint (2 here)
        best = 0.0
        for k in range(n + 1):
            for subset in itertools.combinations(range(n), k):
                if sum(costs[i] for i in subset) <= budget and sum(layers[i] == "l0" for i in subset) <= room["l0"]:
                    best = min(best, sum(gains[i] for i in subset))
        assert res.objective <= best + 1e-9  # the relaxation is at least as good as every feasible set
        assert sum(c.cost for c in chosen) <= budget + 1e-9 and sum(c.layer == "l0" for c in chosen) <= room["l0"]
        assert all(c.gain < 0 for c in chosen)
    # equal costs, no caps: the LP is integral and picks the brute-force best set
    gains = np.array([-3.0, 0.5, -1.0, -2.0, -0.5, 1.0])
    cands = [Candidate(s2d_split("l", i, g, torch.zeros(1)), 1.0, "g") for i, g in enumerate(gains)]
    chosen, res = select_lp(cands, {"g": 3.0})
    assert sorted(c.split.channel for c in chosen) == [0, 2, 3] and res.objective == pytest.approx(-6.0)


def test_ratio_selection_counts_new_neurons_and_quotas():
    v = torch.zeros(1)
    cands = [Candidate(s2d_split("a", i, -i - 1.0, v), group="A") for i in range(10)] + \
            [Candidate(s2d_split("b", i, -0.1, v), group="B") for i in range(10)] + \
            [Candidate(s2d_split("b", 10 + i, 0.5, v), group="B") for i in range(5)]
    got = select_ratio(cands, {"a": 10, "b": 15}, ratio=0.2)
    assert len(got) == 5 and all(c.layer == "a" for c in got)  # the 5 most negative overall
    got = select_ratio(cands, {"a": 10, "b": 15}, ratio=0.2, quotas={"A": 0.1, "B": 0.4},
                       groups={"a": "A", "b": "B"})
    assert sum(c.layer == "a" for c in got) == 1 and sum(c.layer == "b" for c in got) == 6
    assert all(c.gain < 0 for c in got)  # only_negative drops the 5 positive ones even with room left
    got = select_ratio(cands, {"a": 10, "b": 15}, ratio=1.0, only_negative=False)
    assert len(got) == 25


@pytest.mark.parametrize("name", ["test_mobilenetv2", "test_pointnet"])
def test_channel_costs_equal_measured_increase(name):
    import search_spaces
    from nas_split.cost import measure_cost

    model = search_spaces.create(name, num_classes=5, in_chans=3, input_size=16).eval()
    x = torch.randn(2, 3, 16, 16) if "mobilenet" in name else torch.randn(2, 3, 32)
    graph = CouplingGraph(model, x)
    layers = ns.growable_layers(model, x, graph=graph)
    per = channel_costs(model, x, {n: graph.group(n) for n in layers})
    base = measure_cost(model, x, latency=False)
    for layer in layers:
        trial = copy.deepcopy(model)
        ns.split(trial, x, {layer: [0]}, eps=0.0)
        grown = measure_cost(trial, x, latency=False)
        assert grown.macs - base.macs == pytest.approx(per[layer].macs, rel=1e-9, abs=1e-9), layer
        assert grown.priced - base.priced == pytest.approx(per[layer].priced, rel=1e-6), layer
        assert grown.priced == pytest.approx(grown.energy_uj, rel=1e-12)  # the default model is the estimate


def _one_per_group(graph, layers):
    owned, out = set(), []
    for n in layers:
        if not owned & set(graph.group(n).producers):
            owned |= set(graph.group(n).producers)
            out.append(n)
    return out


@pytest.mark.parametrize("name", ["test_mobilenetv2", "test_pointnet", "mobilenetv1_cifar_025"])
def test_macs_after_growth_equals_real_split_with_cross_terms(name):
    """Several coupled groups grown at once (consumer fed by two grown layers): exact, not the linear sum."""
    import search_spaces
    from nas_split.cost import count_macs

    model = search_spaces.create(name, num_classes=5, in_chans=3, input_size=16).eval()
    x = torch.randn(2, 3, 16, 16) if "mobilenet" in name else torch.randn(2, 3, 32)
    graph = CouplingGraph(model, x)
    layers = _one_per_group(graph, ns.growable_layers(model, x, graph=graph))
    groups = {n: graph.group(n) for n in layers}
    added = {n: 1 + i % 3 for i, n in enumerate(layers)}
    trial = copy.deepcopy(model)
    ns.split(trial, x, {n: list(range(k)) for n, k in added.items()}, eps=0.0)
    assert macs_after_growth(model, x, groups, added) == pytest.approx(count_macs(trial, x)[0], rel=1e-12)
    linear = count_macs(model, x)[0] + sum(k * c.macs for n, k in added.items()
                                           for c in [channel_costs(model, x, {n: groups[n]})[n]])
    assert count_macs(trial, x)[0] > linear  # the cross terms are real


def test_prefix_within_macs_is_the_longest_fitting_prefix():
    import search_spaces
    from nas_split.cost import count_macs

    model = search_spaces.create("test_mobilenetv2", num_classes=5, in_chans=3, input_size=16).eval()
    x = torch.randn(2, 3, 16, 16)
    graph = CouplingGraph(model, x)
    layers = _one_per_group(graph, ns.growable_layers(model, x, graph=graph))
    g = torch.Generator().manual_seed(0)
    items = [(layers[int(i)], 1) for i in torch.randint(len(layers), (30,), generator=g)]
    base = count_macs(model, x)[0]

    def real(k):  # brute force: split the first k items on a copy and count
        trial, plan = copy.deepcopy(model), {}
        for n, _ in items[:k]:
            plan.setdefault(n, []).append(len(plan.get(n, [])))
        ns.split(trial, x, plan, eps=0.0)
        return count_macs(trial, x)[0]

    sizes = [real(k) for k in range(len(items) + 1)]
    for budget in (base - 1, base, (sizes[7] + sizes[8]) / 2, sizes[19], sizes[-1] + 1):
        k = prefix_within_macs(model, x, items, budget)
        assert k == max(i for i, m in enumerate(sizes) if m <= budget) if budget >= base else k == 0


@pytest.mark.parametrize("energy_aware", [False, True])
def test_grower_max_macs_lands_under_the_budget(energy_aware):
    import search_spaces
    from nas_split.cost import count_macs

    torch.manual_seed(0)
    model = search_spaces.create("test_mobilenetv1", num_classes=4, in_chans=3, input_size=16)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 4, (32,))
    base = count_macs(model, x)[0]
    budget = 1.3 * base
    g = Grower(model, x, "fast", max_macs=budget, grow_ratio=None, only_negative=False,
               energy_aware=energy_aware)
    rep = g.step([(x, y)])
    after = count_macs(model, x)[0]
    assert after <= budget
    # the next best candidate would not have fitted: the budget, not the ratio, set the count
    one_more = min(c.macs for c in channel_costs(model, x, {n: CouplingGraph(model, x).group(n)
                                                              for n in g.neurons()}).values())
    assert after + one_more > 0.97 * budget and rep.new_neurons > 0


def test_grower_bad_input():
    net, x, y = tiny("linear", "tanh")
    with pytest.raises(ValueError, match="unknown growth method"):
        Grower(net, x, "s4d")
    with pytest.raises(ValueError, match="c must be >= 1"):
        Grower(net, x, "s3d", c=0.5)
    with pytest.raises(ValueError, match="eps must be > 0"):
        Grower(net, x, "s2d", eps=0.0)
    with pytest.raises(ns.NotGrowableError, match="no growable layer"):
        Grower(nn.Sequential(nn.Linear(3, 2)), torch.randn(2, 3), "s2d")
    g = Grower(net, x, "s2d")
    with pytest.raises(FloatingPointError, match="loss is nan"):
        g.step([(x * float("nan"), y)])
