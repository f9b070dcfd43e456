"""Anytime networks (nas_split.anytime) and orthogonalized SGD (nas_split.osgd): growth keeps earlier levels as
prefix sub-networks, a level runs as its extracted network (outputs, gradients, running statistics), levels travel
with the grown-model file, every level has batch statistics of its own, and OSGD's components are orthogonal and
sum to the applied gradient."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nas_split as ns
import search_spaces
from baselines.firefly import firefly_grow
from baselines.gradmax import gradmax_counts, gradmax_grow
from baselines.random_growth import random_grow
from baselines.variance_transfer import vt_counts, vt_grow
from nas_split import anytime as at
from nas_split.numerics import evaluating
from nas_split.osgd import orthogonalize, osgd_backward
from nas_split.surgery import CouplingGraph, NewChannels, fan_in_shape, layer_sizes, layer_widths
from nas_split.surgery.rebuild import width_groups

# name: (in_chans, input size); test_mobilenetv1/v2 are small-input MobileNets (stride-1 stem), as is
# mobilenetv1_cifar_025 at 8 px
SPACES = {"test_mlp": (1, 6), "test_mobilenetv1": (3, 16), "test_mobilenetv2": (3, 8),
          "mobilenetv1_cifar_025": (3, 8), "test_pointnet": (3, 24)}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: a second thread only adds synchronisation (on a loaded 2-core machine, depthwise convs then
    take 100x longer)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    chans, size = SPACES[name]
    model = search_spaces.create(name, 4, chans, size).double()
    x = torch.randn(6, chans, size) if name == "test_pointnet" else torch.randn(6, chans, size, size)
    return model, x.double()


def _warm(model: nn.Module, x: torch.Tensor) -> None:
    """One train-mode batch, so the running statistics are not the identity."""
    with torch.no_grad():
        model.train()(x * 1.5 + 0.5)
    model.eval()


def _add_neurons(model: nn.Module, x: torch.Tensor, gen: torch.Generator) -> None:
    """Two new channels in every coupling group, with random fan-in and fan-out (not function-preserving for the
    full model), and an S2D split of one channel (ε = 0.1)."""
    graph = CouplingGraph(model, x)
    roots = list(width_groups(model, x, graph))
    additions = {}
    for r in roots:
        fan_out = {s.name: torch.randn(2, *s.module.weight[:, 0].shape, generator=gen, dtype=torch.float64)
                   for s in graph.group(r).slots if s.role == "consumer" and len(s.positions[0]) == 1}
        additions[r] = NewChannels(2, torch.randn(2, *fan_in_shape(graph.modules[r]), generator=gen,
                                                  dtype=torch.float64), fan_out)
    ns.add_channels(model, x, additions, graph=graph)
    ns.split(model, x, {roots[-1]: [0]}, eps=0.1, generator=gen)


def _nested(name: str, growths: int = 2) -> tuple[nn.Module, torch.Tensor]:
    """A model with ``growths + 1`` levels, each with running statistics of its own."""
    model, x = _model(name)
    _warm(model, x)
    at.add_level(model, x)
    gen = torch.Generator().manual_seed(1)
    for _ in range(growths):
        _add_neurons(model, x, gen)
        at.add_level(model, x)
        _warm(model, x)
    return model, x


def _nonzero_sorted(t: torch.Tensor) -> torch.Tensor:
    t = t.flatten()
    return t[t != 0].sort().values


# --- growth keeps earlier levels as prefixes ----------------------------------------------------------------------

def _grow_new_neurons(model, x, loader):
    gen = torch.Generator().manual_seed(2)
    graph = CouplingGraph(model, x)
    roots = list(width_groups(model, x, graph))
    ns.add_channels(model, x, {r: NewChannels(3, torch.randn(3, *fan_in_shape(graph.modules[r]), generator=gen,
                                                             dtype=torch.float64)) for r in roots}, graph=graph)
    return []


def _grow_gradmax(model, x, loader):
    gradmax_grow(model, x, gradmax_counts(model, x, 0.5), loader)
    return []


def _grow_vt(model, x, loader):
    vt_grow(model, x, vt_counts(model, x, 0.5))
    return []


def _grow_splitting(method):
    def grow(model, x, loader):
        eps = 0.05
        report = ns.Grower(model, x, method, grow_ratio=0.3, eps=eps).step(loader)
        assert report.splits
        return [(s.layer, s.channel, s.scheme.weights[0], eps * s.scheme.directions[0]) for s in report.splits]
    return grow


def _grow_firefly(model, x, loader):
    report = firefly_grow(model, x, loader, grow_ratio=0.3, k=2, steps=2, eps=0.0)
    assert report.splits and report.new
    return [(layer, c, 0.5, None) for layer, cs in report.splits.items() for c in cs]


def _grow_random(model, x, loader):
    report = random_grow(model, x, 0.3, eps=0.0)
    return [(r.layer, r.channel, r.weights[0], None) for r in report.records]


# method: (grow, is the earlier level's function kept at insertion?, backbone); Firefly on MobileNetV1: on
# MobileNetV2 its candidates fail where a consumer of a residual stream also writes it (blocks.0.0.conv_pw)
GROWTH = {"new-neurons": (_grow_new_neurons, True, "test_mobilenetv2"),
          "gradmax": (_grow_gradmax, True, "test_mobilenetv2"), "vt": (_grow_vt, True, "test_mobilenetv2"),
          "s2d": (_grow_splitting("s2d"), False, "test_mobilenetv2"),
          "s3d": (_grow_splitting("s3d"), False, "test_mobilenetv2"),
          "firefly": (_grow_firefly, False, "test_mobilenetv1"), "random": (_grow_random, False, "test_mobilenetv2")}


@torch.no_grad()
def _as_split(before: nn.Module, x: torch.Tensor, splits: list) -> nn.Module:
    """``before`` with what a split does to the parent channel itself: its row displaced (``θ + ε δ_0``), then
    its consumer columns weighted by the first copy's ``w_0``; the copies are left out."""
    exp = copy.deepcopy(before)
    graph = CouplingGraph(exp, x)
    for layer, c, _, delta in splits:
        if delta is not None:
            graph.modules[layer].weight[c] += delta.to(torch.float64)
    for layer, c, w0, _ in splits:
        for s in graph.group(layer).slots:
            if s.role == "consumer":
                s.module.weight[:, list(s.positions[c])] *= w0
    return exp


@pytest.mark.parametrize("method", GROWTH)
def test_growth_keeps_the_earlier_level_as_a_prefix(method):
    """After growth, level 0 of the grown model (eval mode, float64) is the model before growth where the method
    leaves the old channels' function alone: new neurons (any fan-in, fan-out), GradMax, and vt (which rescales
    old consumer columns by β and their norms by β, β², ε β²: exact in eval mode).  The splitting methods (S2D,
    S3D, random, Firefly's splits) are not function-preserving for the prefix: the parent keeps only its copy's
    share ``w_0`` of the fan-out (½ for S2D, signed for S3D) and is displaced by ``ε δ_0``; their prefix is the
    earlier model with exactly that change to the parents, which shows that the copies went after the old
    channels."""
    grow, preserving, backbone = GROWTH[method]
    model, x = _model(backbone)
    _warm(model, x)
    y = torch.arange(len(x)) % 4
    at.add_level(model, x)
    before = copy.deepcopy(model)
    splits = grow(model, x, [(x, y)] * 2)
    assert at.levels(model)[0] == layer_widths(before) != layer_widths(model)
    at.add_level(model, x)
    reference = before if preserving else _as_split(before, x, splits)
    with torch.no_grad(), evaluating(model):
        with at.set_level(model, 0):
            prefix = model(x)
        expected, old = reference.eval()(x), before.eval()(x)
    assert (prefix - expected).abs().max() <= 1e-5 * expected.abs().max()
    if not preserving:
        assert (prefix - old).abs().max() > 1e-4 * old.abs().max()


def test_vt_keeps_every_earlier_level_through_two_growths():
    """vt rescales the old consumers' norms (running statistics and ε); the private statistics of a level stored
    before a later growth follow that rescaling (add_level reads it from ε), so level 0 is still the seed."""
    model, x = _model("test_mobilenetv1")
    _warm(model, x)
    snapshots = [copy.deepcopy(model)]
    at.add_level(model, x)
    for _ in range(2):
        vt_grow(model, x, vt_counts(model, x, 0.5))
        at.add_level(model, x)
        snapshots.append(copy.deepcopy(model))
    with torch.no_grad(), evaluating(model):
        for k, snap in enumerate(snapshots):
            with at.set_level(model, k):
                out = model(x)
            ref = snap.eval()(x)
            assert (out - ref).abs().max() <= 1e-6 * ref.abs().max(), k


# --- a level runs as its extracted network ------------------------------------------------------------------------

@pytest.mark.parametrize("name", SPACES)
def test_a_level_runs_as_its_extracted_network(name):
    """At every level, in train and eval mode: the same outputs as the extracted network, the same gradients (the
    full parameters' nonzero entries are the extracted ones'), the same running statistics after the train-mode
    batch; and the full model is back after the ``with`` block."""
    model, x = _nested(name)
    untouched = copy.deepcopy(model)
    widths = at.levels(model)
    assert len(widths) == 3 and widths[0] != widths[1] != widths[2] == layer_widths(model)
    for k in range(3):
        sub = at.extract(model, k)
        assert layer_widths(sub) == widths[k] and at.levels(sub) == widths[:k + 1]
        model.train()
        sub.train()
        model.zero_grad()
        with at.set_level(model, k) as m:
            out = m(x)
        ref = sub(x)
        assert torch.allclose(out, ref, rtol=1e-9, atol=1e-12)
        (out ** 2).sum().backward()
        (ref ** 2).sum().backward()
        subs = dict(sub.named_parameters())
        for n, p in model.named_parameters():
            g = torch.zeros_like(p) if p.grad is None else p.grad
            s = torch.zeros_like(subs[n]) if subs[n].grad is None else subs[n].grad
            assert torch.allclose(_nonzero_sorted(g), _nonzero_sorted(s), rtol=1e-9, atol=1e-12), (k, n)
        after = at.extract(model, k)
        stats = {n: b for n, b in sub.named_buffers()}
        for n, b in after.named_buffers():
            assert torch.allclose(b.to(stats[n]), stats[n], rtol=1e-12, atol=1e-12), (k, n)
        with torch.no_grad(), evaluating(model), at.set_level(model, k):
            out = model(x)
        assert torch.allclose(out, sub.eval()(x).detach(), rtol=1e-9, atol=1e-12)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), untouched.parameters(), strict=True))
    assert layer_sizes(model) == layer_sizes(untouched)
    with torch.no_grad():  # the full model is level 2, which ran the same batch as its extracted copy
        assert torch.equal(model.eval()(x), sub.eval()(x))


def test_switches_nest_and_refuse_a_grown_model_without_its_level():
    model, x = _nested("test_mlp")
    model.eval()
    with torch.no_grad():
        outs = []
        for k in range(3):
            with at.set_level(model, k):
                outs.append(model(x))
        with at.set_level(model, 0):
            with at.set_level(model, 1):
                assert torch.equal(model(x), outs[1])
            assert torch.equal(model(x), outs[0])  # the outer level is back
        with at.set_level(model, 2):
            at.set_level(model, 0)  # a plain call switches until the next switch or the end of the block
            assert torch.equal(model(x), outs[0])
        assert torch.equal(model(x), outs[2])
        at.set_level(model, 1)
        assert torch.equal(model(x), outs[1])
        at.set_level(model, -1)
        assert torch.equal(model(x), outs[2])
    with pytest.raises(at.LevelError, match="integer in"):
        at.set_level(model, 3)
    ns.split(model, x, {"features.1": [0]}, eps=0.0)
    with pytest.raises(at.LevelError, match="add_level"):
        at.set_level(model, 0)


_RELOAD = """
import sys, torch
torch.set_num_threads(1)
import nas_split as ns
from nas_split import anytime as at
torch.set_default_dtype(torch.float64)  # the saved model is float64: build it so, and load its weights exactly
d = sys.argv[1]
x, refs = torch.load(d + '/x.pt'), torch.load(d + '/refs.pt')
full = ns.load_grown(d + '/grown.pt').eval()
alone = ns.load_grown(d + '/level1.pt').eval()
errors = []
with torch.no_grad():
    for k, ref in enumerate(refs):
        with at.set_level(full, k):
            errors.append((full(x) - ref).abs().max().item())
        errors.append((at.extract(full, k).eval()(x) - ref).abs().max().item())
    errors.append((alone(x) - refs[1]).abs().max().item())
    with at.set_level(alone, 0):
        errors.append((alone(x) - refs[0]).abs().max().item())
print(len(at.levels(full)), len(at.levels(alone)), max(errors))
"""


def test_levels_travel_with_the_grown_model_file(tmp_path):
    """save_grown writes the levels (and an extracted level's own); load_grown in a fresh process, without example
    inputs or the run directory, runs and extracts every level with the outputs of before."""
    model, x = _nested("test_mobilenetv2")
    model.eval()
    with torch.no_grad():
        refs = []
        for k in range(3):
            with at.set_level(model, k):
                refs.append(model(x))
    ns.save_grown(model, tmp_path / "grown.pt")
    ns.save_grown(at.extract(model, 1), tmp_path / "level1.pt")
    torch.save(x, tmp_path / "x.pt")
    torch.save(refs, tmp_path / "refs.pt")
    p = subprocess.run([sys.executable, "-c", _RELOAD, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    levels, own, err = p.stdout.split()
    assert (levels, own) == ("3", "2") and float(err) <= 1e-12


def test_a_model_without_levels_saves_as_before(tmp_path):
    model, x = _model("test_mlp")
    ns.save_grown(model, tmp_path / "plain.pt")
    assert "levels" not in torch.load(tmp_path / "plain.pt", weights_only=True)
    assert at.levels(ns.load_grown(tmp_path / "plain.pt")) == []


# --- batch norm per level -----------------------------------------------------------------------------------------

def test_every_level_keeps_batch_statistics_of_its_own():
    """Each level sees a batch of its own distribution in train mode; afterwards each level's running statistics
    (and eval outputs) are those its extracted network gets from its batch alone.  Shared statistics fail this:
    the last batch would overwrite the earlier levels' entries."""
    model, x = _nested("test_mobilenetv1")
    refs = [at.extract(model, k).train() for k in range(3)]
    batches = [x * (k + 1) + 2 * k for k in range(3)]
    model.train()
    with torch.no_grad():
        for k in range(3):
            with at.set_level(model, k):
                model(batches[k])
            refs[k](batches[k])
    means = []
    for k in range(3):
        got = dict(at.extract(model, k).named_buffers())
        for n, b in refs[k].named_buffers():
            assert torch.allclose(got[n], b, rtol=1e-10, atol=1e-12), (k, n)
        means.append(got["bn1.running_mean"])
        with torch.no_grad(), evaluating(model), at.set_level(model, k):
            out = model(x)
        assert torch.allclose(out, refs[k].eval()(x), rtol=1e-9, atol=1e-12)
    assert (means[0] - means[1][:len(means[0])]).abs().max() > 0.1  # the levels' statistics differ


def test_recalibrate_recomputes_one_levels_statistics():
    model, x = _nested("test_mobilenetv2")
    loader = [(x * 2 + 1, None), (x - 1, None), (x * 5, None)]
    ref = at.extract(model, 0)
    other = dict(at.extract(model, 1).named_buffers())
    at.recalibrate(model, 0, loader, batches=2)
    norms = [m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    ref.eval()
    for m in norms:
        m.train()
    with torch.no_grad():
        for b, _ in loader[:2]:
            ref(b)
    got = dict(at.extract(model, 0).named_buffers())
    for n, b in ref.named_buffers():
        assert torch.allclose(got[n], b, rtol=1e-10, atol=1e-12), n
    assert all(torch.equal(b, other[n]) for n, b in at.extract(model, 1).named_buffers())  # level 1 untouched
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# --- orthogonalized SGD -------------------------------------------------------------------------------------------

def _level_losses(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    y = torch.arange(len(x)) % 4
    losses = []
    for k in range(len(at.levels(model))):
        with at.set_level(model, k):
            losses.append(F.cross_entropy(model(x), y))
    return losses


@pytest.mark.parametrize("unit", ["tensor", "vector"])
def test_osgd_components_are_orthogonal_and_sum_to_the_gradient(unit):
    model, x = _nested("test_mobilenetv1")
    model.train()
    params = list(model.parameters())
    parts = osgd_backward(_level_losses(model, x), params, unit=unit)
    assert len(parts) == 3

    def dot(a, b, i=None):
        pairs = zip(a, b, strict=True) if i is None else [(a[i], b[i])]
        return sum(float((u * v).sum()) for u, v in pairs)

    blocks = range(len(params)) if unit == "tensor" else [None]
    for i in blocks:
        for j in range(3):
            for k in range(j):
                bound = 1e-6 * (dot(parts[j], parts[j], i) * dot(parts[k], parts[k], i)) ** 0.5
                assert abs(dot(parts[j], parts[k], i)) <= bound + 1e-30, (i, j, k)
    for i, p in enumerate(params):
        assert torch.allclose(p.grad, parts[0][i] + parts[1][i] + parts[2][i], rtol=0, atol=1e-14)
    # the components are Gram-Schmidt of the levels' own gradients (autograd, one level at a time)
    g = [torch.autograd.grad(loss, params, allow_unused=True) for loss in _level_losses(model, x)]
    g = [[torch.zeros_like(p) if t is None else t for t, p in zip(gs, params, strict=True)] for gs in g]
    for i in blocks:
        g1, g2 = g[0], g[1]
        c = dot(g2, g1, i) / dot(g1, g1, i)
        for q, (a, b, r) in enumerate(zip(g1, g2, parts[1], strict=True)):
            if i in (None, q):
                assert torch.allclose(parts[0][q], a, rtol=1e-12, atol=1e-15)
                assert torch.allclose(r, b - c * a, rtol=1e-9, atol=1e-12)


def test_osgd_drops_a_gradient_already_in_the_span():
    a, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    parts = orthogonalize([[a], [2 * a], [b], [torch.zeros(5, dtype=torch.float64)]])
    assert torch.equal(parts[1][0], torch.zeros(5, dtype=torch.float64)) and torch.equal(parts[3][0], parts[1][0])
    assert torch.equal(parts[0][0], a) and abs(float(parts[2][0] @ a)) <= 1e-12 * float(b.norm() * a.norm())


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_osgd_with_one_level_is_plain_training_bit_for_bit(opt):
    model, x = _model("test_mobilenetv1")
    model.train()
    y = torch.arange(len(x)) % 4
    twin = copy.deepcopy(model)

    def make(m):
        if opt == "sgd":
            return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        return torch.optim.AdamW(m.parameters(), lr=1e-2)

    o1, o2 = make(model), make(twin)
    for _ in range(3):
        o1.zero_grad()
        F.cross_entropy(model(x), y).backward()
        o1.step()
        o2.zero_grad()
        osgd_backward([F.cross_entropy(twin(x), y)], twin.parameters(), mode="osgd")
        o2.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True))


def test_sum_and_last_modes_are_the_plain_gradients():
    model, x = _nested("test_mlp")
    model.train()
    params = list(model.parameters())
    per_level = [torch.autograd.grad(loss, params) for loss in _level_losses(model, x)]
    osgd_backward(_level_losses(model, x), params, mode="sum")
    for i, p in enumerate(params):
        assert torch.allclose(p.grad, sum(g[i] for g in per_level), rtol=1e-12, atol=1e-15)
    osgd_backward(_level_losses(model, x), params, mode="last")
    assert all(torch.equal(p.grad, per_level[-1][i]) for i, p in enumerate(params))


_RANK = """
import sys, torch, torch.distributed as dist
torch.set_num_threads(1)
from nas_split.distributed import batch_share
from nas_split.osgd import osgd_backward
r, d = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{d}/group", rank=r, world_size=2)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
x, y = torch.randn(10, 5, dtype=torch.float64), torch.arange(10) % 3
part = slice(0, 4) if r == 0 else slice(4, 10)  # unequal shards: the shares weigh them
losses = [torch.nn.functional.cross_entropy(net(x[part]) * (k + 1), y[part]) for k in range(3)]
osgd_backward(losses, net.parameters(), share=batch_share(len(y[part])))
torch.save([p.grad for p in net.parameters()], f"{d}/grad{r}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_osgd_projects_the_whole_batchs_gradients_across_processes(tmp_path):
    """Two gloo processes with unequal shards of a batch set the ``.grad`` one process sets on the whole batch."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(r), str(tmp_path)], env=env, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.arange(10) % 3
    osgd_backward([F.cross_entropy(net(x) * (k + 1), y) for k in range(3)], net.parameters())
    for r in range(2):
        for g, p in zip(torch.load(tmp_path / f"grad{r}.pt"), net.parameters(), strict=True):
            assert torch.allclose(g, p.grad, rtol=1e-10, atol=1e-13)
