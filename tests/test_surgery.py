"""Channel surgery: function preservation on every backbone, coupling, optimizer carry, export, bad input."""
import copy
import subprocess
import sys
import zlib

import pytest
import timm
import torch
from torch import nn

import nas_split as ns
import search_spaces
from nas_split.surgery import CouplingGraph, NewChannels, NotGrowableError, SplitScheme, fan_in_shape
from search_spaces._registry import _SPACES

SIGNED = (2.0, -0.5, -0.5)


def _inputs(name, batch=4, size=16):
    if search_spaces.info(name).input_kind == "points":
        return torch.randn(batch, 3, 32)
    return torch.randn(batch, 3, size, size)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def random_plan(model, x, gen, weights=(0.5, 0.5), asymmetric=False, frac=0.7):
    """A plan over all growable layers: one layer per coupled group, random channels, the given copy weights."""
    graph = CouplingGraph(model, x)
    owned, plan = set(), {}
    for layer in ns.growable_layers(model, x, graph=graph):
        group = graph.group(layer)
        if owned & set(group.producers) or (plan and torch.rand(1, generator=gen).item() > frac):
            continue
        owned |= set(group.producers)
        k = int(torch.randint(1, min(3, group.width) + 1, (1,), generator=gen))
        chans = torch.randperm(group.width, generator=gen)[:k].tolist()
        row = fan_in_shape(graph.modules[layer])
        entries = []
        for c in chans:
            v = torch.randn(len(weights), *row, generator=gen)
            if not asymmetric:  # sum_i w_i delta_i = 0 (pure splitting, second order)
                v = torch.stack([torch.zeros(row), v[1], -v[1]]) if len(weights) == 3 else torch.stack([v[0], -v[0]])
            unit = v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * len(row))
            entries.append((c, SplitScheme(weights, unit)))
        plan[layer] = entries
    assert plan
    return plan


def _consistent(model):
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups)
        elif isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.weight.shape == m.running_var.shape == (m.num_features,)


BACKBONES = sorted(_SPACES) + ["mobilenetv1_100", "mobilenetv2_050", "mobilenetv2_100"]


@pytest.mark.parametrize("weights", [(0.5, 0.5), SIGNED], ids=["s2d", "signed"])
@pytest.mark.parametrize("name", BACKBONES)
def test_split_preserves_function_on_every_backbone(name, weights):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}{weights}".encode()))  # hash() differs per process
    thin = {"width_mult": 0.25} if name.startswith("pointnet") else {}  # the structure matters, not 1024 channels
    model = search_spaces.create(name, num_classes=5, in_chans=3, input_size=16, **thin).eval()
    x = _inputs(name)
    with torch.no_grad():
        ref = model(x)
    plan = random_plan(model, x, gen, weights)
    before = sum(p.numel() for p in model.parameters())
    report = ns.split(model, x, plan, eps=0.0)
    _consistent(model)
    with torch.no_grad():
        out = model(x)
    assert _rel(out, ref) <= 1e-5
    assert report.new_neurons == sum(len(v) for v in plan.values()) * (len(weights) - 1)
    assert sum(p.numel() for p in model.parameters()) > before
    # eps > 0 with a net displacement changes the function (every coupled group: a plan of the T-Net's layers
    # alone would not, as its last layer starts at zero)
    trial = copy.deepcopy(model)
    ns.split(trial, x, random_plan(trial, x, gen, weights, asymmetric=True, frac=1.0), eps=0.5)
    with torch.no_grad():
        assert _rel(trial(x), ref) > 1e-4
    # and a training step runs on the grown model
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = nn.functional.cross_entropy(model(_inputs(name, batch=4)), torch.arange(4) % 5)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_mobilenetv2_100_growable_layers_and_residual_split():
    model = timm.create_model("mobilenetv2_100", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    layers = ns.growable_layers(model, x)
    assert {"conv_stem", "blocks.1.0.conv_pw", "blocks.1.0.conv_pwl", "blocks.3.2.conv_pw", "conv_head"} <= set(layers)
    assert "classifier" not in layers and not any("conv_dw" in n for n in layers)
    group = CouplingGraph(model, x).group("blocks.2.0.conv_pwl")  # residual stream of stage 2 (32 channels)
    assert {"blocks.2.0.conv_pwl", "blocks.2.1.conv_pwl", "blocks.2.2.conv_pwl"} <= set(group.producers)
    with torch.no_grad():
        ref = model(x)
    ns.split(model, x, {"blocks.2.1.conv_pwl": [3, 7]}, eps=0.0)
    assert [model.blocks[2][i].conv_pwl.out_channels for i in range(3)] == [34, 34, 34]
    assert model.blocks[3][0].conv_pw.in_channels == 34 and model.blocks[2][2].has_skip
    with torch.no_grad():
        assert _rel(model(x), ref) <= 1e-5


def test_split_places_displaced_copies_and_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    w0 = model[0].weight.detach().clone()
    w2 = model[2].weight.detach().clone()
    v = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [-1.0, 0, 0]])
    rep = ns.split(model, torch.randn(2, 3), {"0": [(1, SplitScheme(SIGNED, v))]}, eps=0.1)
    assert rep.records[0].positions == [1, 4, 5]
    assert torch.equal(model[0].weight[1], w0[1])
    assert torch.allclose(model[0].weight[4], w0[1] + torch.tensor([0.1, 0, 0]))
    assert torch.allclose(model[0].weight[5], w0[1] - torch.tensor([0.1, 0, 0]))
    assert torch.equal(model[0].bias[4], model[0].bias[1])
    assert torch.allclose(model[2].weight[:, 1], 2 * w2[:, 1])
    assert torch.allclose(model[2].weight[:, 4], -0.5 * w2[:, 1]) and torch.equal(model[2].weight[:, 0], w2[:, 0])


def test_second_order_change_matches_symmetric_split():
    """S2D at small eps changes the loss by O(eps^2): halving eps divides the change by ~4."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(64, 4, dtype=torch.float64)
    ref = model(x)
    changes = []
    d = torch.randn(4, dtype=torch.float64)
    for eps in (1e-2, 5e-3):
        m = copy.deepcopy(model)
        ns.split(m, x, {"0": [(2, SplitScheme.s2d(d / d.norm()))]}, eps=eps)
        changes.append((m(x) - ref).abs().max().item())
    assert changes[0] / changes[1] == pytest.approx(4.0, rel=0.05)


def _sgd_run(model, x, y, opt, steps):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_optimizer_state_carried_exactly():
    torch.manual_seed(0)
    model = search_spaces.create("test_mobilenetv1", num_classes=4, in_chans=3, input_size=16)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    for opt_cls in (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), lambda p: torch.optim.AdamW(p, lr=1e-3)):
        m = copy.deepcopy(model)
        opt = opt_cls(m.parameters())
        _sgd_run(m, x, y, opt, 3)
        state_before = {n: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dim()}
                        for n, p in m.named_parameters()}
        m.eval()
        ns.split(m, x, {"blocks.1.0.conv_pw": [(2, SplitScheme(SIGNED))]}, eps=0.0, optimizer=opt)
        params = dict(m.named_parameters())
        in_opt = {id(q) for g in opt.param_groups for q in g["params"]}
        assert all(id(p) in in_opt for p in params.values()) and len(in_opt) == len(params)
        for n, p in params.items():
            st = opt.state[p]
            for k, old in state_before[n].items():
                new = st[k]
                assert new.shape == p.shape
                if new.shape == old.shape:  # untouched parameter: bit-identical
                    assert torch.equal(new, old), (n, k)
        # untouched channels of a touched parameter are bit-identical too
        pw = params["blocks.1.0.conv_pw.weight"]
        key = "momentum_buffer" if "momentum_buffer" in opt.state[pw] else "exp_avg"
        old = state_before["blocks.1.0.conv_pw.weight"][key]
        assert torch.equal(opt.state[pw][key][:2], old[:2]) and torch.equal(opt.state[pw][key][3:old.shape[0]],
                                                                            old[3:])
        # copies: first moments scale with w_i, second moments with w_i^2
        assert torch.allclose(opt.state[pw][key][2], 2.0 * old[2])
        assert torch.allclose(opt.state[pw][key][-1], -0.5 * old[2])
        if key == "exp_avg":
            sq = state_before["blocks.1.0.conv_pw.weight"]["exp_avg_sq"]
            assert torch.allclose(opt.state[pw]["exp_avg_sq"][-1], 0.25 * sq[2])
        m.train()
        _sgd_run(m, x, y, opt, 1)  # the carried optimizer steps the new parameters


def test_state_rule_equals_gradients_of_the_split_network():
    """At eps = 0 the carried-state transform maps the old gradient to the split network's gradient exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.SiLU(),
                          nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6), nn.SiLU(),
                          nn.Conv2d(6, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double().eval()
    x, y = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    nn.functional.cross_entropy(model(x), y).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():  # pretend the momentum buffer is this gradient
        opt.state[p]["momentum_buffer"] = p.grad.clone()
    ns.split(model, x, {"0": [(1, SplitScheme(SIGNED)), (4, SplitScheme.s2d())]}, eps=0.0, optimizer=opt)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(opt.state[p]["momentum_buffer"], p.grad, atol=1e-12), n


def test_carried_momentum_continues_the_loss_curve():
    torch.manual_seed(3)
    from nas_split.data import create_dataset

    d = create_dataset("digits", seed=0)
    x, y = d.train.tensors[0][:512], d.train.tensors[1][:512]
    base = search_spaces.create("test_mlp", num_classes=10, in_chans=1, input_size=8, norm=False, act="tanh")
    opt = torch.optim.SGD(base.parameters(), lr=0.05, momentum=0.95)
    _sgd_run(base, x, y, opt, 40)
    runs = {}
    for mode in ("none", "carry", "reset"):
        m, o = copy.deepcopy((base, opt))
        if mode != "none":
            ns.split(m, x[:4], {"features.1": list(range(8))}, eps=0.0, optimizer=o)
            if mode == "reset":
                o = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.95)
        runs[mode] = torch.tensor(_sgd_run(m, x, y, o, 10))
    gap_carry = (runs["carry"] - runs["none"]).abs().sum()
    gap_reset = (runs["reset"] - runs["none"]).abs().sum()
    assert gap_carry < 0.25 * gap_reset  # resetting momentum makes the curve jump; carrying does not


def test_add_channels_preserves_function_and_inits_identity():
    torch.manual_seed(0)
    model = search_spaces.create("test_mobilenetv1", num_classes=4, in_chans=3, input_size=16).eval()
    x = torch.randn(4, 3, 16, 16)
    ref = model(x)
    k = 3
    row = fan_in_shape(model.blocks[1][0].conv_pw)
    # zero fan-out, random fan-in
    ns.add_channels(model, x, {"blocks.1.0.conv_pw": NewChannels(k, fan_in=torch.randn(k, *row))})
    assert _rel(model(x), ref) <= 1e-5
    dw, bn = model.blocks[2][0].conv_dw, model.blocks[2][0].bn1
    assert dw.groups == dw.out_channels == 8 + k
    centre = torch.zeros(3, 3)
    centre[1, 1] = 1
    assert all(torch.equal(dw.weight[-j, 0], centre) for j in range(1, k + 1))
    assert torch.equal(bn.weight[-k:], torch.ones(k)) and torch.equal(bn.running_var[-k:], torch.ones(k))
    assert torch.equal(bn.bias[-k:], torch.zeros(k)) and torch.equal(bn.running_mean[-k:], torch.zeros(k))
    # zero fan-in, random fan-out (ReLU6(BN(0)) = 0)
    consumer = model.blocks[2][0].conv_pw
    col = tuple(consumer.weight[:, 0].shape)
    fan_out = {"blocks.2.0.conv_pw": torch.randn(2, *col)}
    ns.add_channels(model, x, {"blocks.1.0.conv_pw": NewChannels(2, fan_out=fan_out)})
    assert _rel(model(x), ref) <= 1e-5
    assert model.blocks[1][0].conv_pw.out_channels == 8 + k + 2


@pytest.mark.parametrize("plan, error, match", [
    ({"nope": [0]}, NotGrowableError, "does not exist"),
    ({"blocks.1.0.conv_dw": [0]}, NotGrowableError, "depthwise"),
    ({"classifier": [0]}, NotGrowableError, "outputs of the model"),
    ({"blocks.1.0.bn1": [0]}, NotGrowableError, "not a conv or linear"),
    ({"blocks.1.0.conv_pw": [8]}, IndexError, "out of range"),
    ({"blocks.1.0.conv_pw": [1, 1]}, ValueError, "listed twice"),
    ({"blocks.1.0.conv_pw": [(0, SplitScheme((0.7, 0.7)))]}, ValueError, "sum to 1"),
    ({"blocks.1.0.conv_pw": [(0, SplitScheme((0.5, 0.5), torch.zeros(2, 3, 1, 1)))]}, ValueError, "directions"),
    ({"blocks.1.0.conv_pw": [(0, SplitScheme((1.0,)))]}, ValueError, "at least 2"),
])
def test_bad_plans_leave_the_model_unchanged(plan, error, match):
    model = search_spaces.create("test_mobilenetv1", num_classes=4, in_chans=3, input_size=16)
    x = torch.randn(2, 3, 16, 16)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        ns.split(model, x, plan)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="eps"):
        ns.split(model, x, {"blocks.1.0.conv_pw": [0]}, eps=-1.0)


def test_residual_tied_layers_named_twice_are_refused():
    model = search_spaces.create("test_mobilenetv2", num_classes=4, in_chans=3, input_size=16)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="share their output channels"):
        ns.split(model, x, {"blocks.2.0.conv_pwl": [0], "blocks.2.1.conv_pwl": [1]})


def test_caps_and_rounding():
    model = nn.Sequential(nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, 2))
    x = torch.randn(2, 3)
    rep = ns.split(copy.deepcopy(model), x, {"0": list(range(10))}, max_width=15)
    assert rep.widths["0"] == (12, 15) and [c for _, c in rep.dropped] == list(range(3, 10))
    rep = ns.split(copy.deepcopy(model), x, {"0": list(range(7))}, round_to=8)
    assert rep.widths["0"] == (12, 16) and len(rep.dropped) == 3
    rep = ns.split(copy.deepcopy(model), x, {"0": [(0, SplitScheme(SIGNED)), 1, 2]}, round_to=8)
    assert rep.widths["0"] == (12, 16)
    rep = ns.split(copy.deepcopy(model), x, {"0": [0, 1]}, round_to=8)
    assert rep.widths["0"] == (12, 12) and len(rep.dropped) == 2  # 14 rounds down below the current width


def _grow(name, x):
    model = search_spaces.create(name, num_classes=6, in_chans=3).eval()
    gen = torch.Generator().manual_seed(0)
    ns.split(model, x, random_plan(model, x, gen, SIGNED), eps=0.05, generator=gen)
    return model


def test_export_reload_in_a_fresh_process(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    model = _grow("mobilenetv2_cifar_050", x)
    ns.save_grown(model, tmp_path / "grown.pt")
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "ref.pt")
    code = (f"import torch, nas_split as ns; m = ns.load_grown(r'{tmp_path}/grown.pt').eval(); "
            f"x = torch.load(r'{tmp_path}/x.pt'); ref = torch.load(r'{tmp_path}/ref.pt'); "
            "out = m(x); print(torch.equal(out, ref), m.feature_info[-1]['num_chs'])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", str(model.feature_info[-1]["num_chs"])]
    payload = torch.load(tmp_path / "grown.pt", weights_only=True)
    assert "optimizer" not in payload and payload["spec"]["space"] == "mobilenetv2_cifar_050"


@pytest.mark.parametrize("name", ["mobilenetv1_100", "mobilenetv2_050"])
def test_timm_shape_string_rebuilds_grown_model(name):
    from timm.models import adapt_model_from_string

    x = torch.randn(2, 3, 32, 32)
    model = _grow(name, x)
    rebuilt = adapt_model_from_string(timm.create_model(name, num_classes=6), ns.surgery.timm_shape_string(model))
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    chans = [e["num_chs"] for e in model.feature_info]
    assert [e["num_chs"] for e in rebuilt.feature_info] == chans  # timm issue #2370 is fixed in this timm
    feats = model.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[1] for f in feats] == chans  # and our surgery refreshed the grown model's own feature_info


def test_save_needs_a_spec_for_unregistered_models(tmp_path):
    with pytest.raises(ValueError, match="spec"):
        ns.save_grown(nn.Linear(2, 2), tmp_path / "m.pt")


class _FlattenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class _ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 5, 1)
        self.head = nn.Conv2d(9, 6, 1)

    def forward(self, x):
        return self.head(torch.cat([torch.tanh(self.a(x)), torch.tanh(self.b(x))], dim=1)).mean((2, 3))


@pytest.mark.parametrize("net, x, plan", [
    (_FlattenNet, torch.randn(3, 2, 3, 3), {"conv": [1, 3]}),  # each channel is 9 columns of fc
    (_ConcatNet, torch.randn(3, 3, 4, 4), {"a": [0, 2], "b": [4]}),  # a's copies go before b's channels
])
def test_flatten_and_concat_couplings(net, x, plan):
    torch.manual_seed(0)
    model = net().eval()
    ref = model(x)
    ns.split(model, x, {k: [(c, SplitScheme(SIGNED)) for c in v] for k, v in plan.items()}, eps=0.0)
    _consistent(model)
    assert _rel(model(x), ref) <= 1e-6
    if net is _FlattenNet:
        assert model.fc.in_features == (4 + 4) * 9
    else:
        assert model.head.in_channels == 9 + 2 * 3


def test_layer_reading_and_writing_the_split_channels_gets_row_displacement_only():
    """test_mobilenetv2: the stem and the first ds block (with skip) share one stream; its 1x1 conv reads and
    writes the channels, so it is both the split layer (rows displaced) and a consumer (columns weighted)."""
    model = search_spaces.create("test_mobilenetv2", num_classes=4, in_chans=3, input_size=16).eval()
    x = torch.randn(2, 3, 16, 16)
    pw = model.blocks[0][0].conv_pw
    w_old = pw.weight.detach().clone()
    group = CouplingGraph(model, x).group("blocks.0.0.conv_pw")
    assert {(s.dim, s.role) for s in group.slots if s.name == "blocks.0.0.conv_pw"} == {("out", "root"),
                                                                                       ("in", "consumer")}
    d = torch.randn(2, *w_old.shape[1:])
    ns.split(model, x, {"blocks.0.0.conv_pw": [(2, SplitScheme(SIGNED[:1] + (-1.0,), d))]}, eps=0.1)
    # rows of channel 2: copy 0 in place, copy 1 appended; columns of channel 2 weighted by (2, -1)
    others = [j for j in range(8) if j != 2]
    assert torch.allclose(pw.weight[2, others], (w_old[2] + 0.1 * d[0])[others])
    assert torch.allclose(pw.weight[8, others], (w_old[2] + 0.1 * d[1])[others])
    assert torch.allclose(pw.weight[others][:, others], w_old[others][:, others])
    assert torch.allclose(pw.weight[others, 2], 2.0 * w_old[others, 2])
    assert torch.allclose(pw.weight[others, 8], -1.0 * w_old[others, 2])
