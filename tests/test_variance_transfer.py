"""``vt`` growth (Yuan, Savarese & Maire 2023): function kept at insertion, variance transfer keeps each
consumer's output variance for independent unit-variance inputs, learning-rate adaptation scales each growth
stage's slice by the stated factor."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import search_spaces
from baselines.variance_transfer import vt_counts, vt_grow
from nas_split.growth.rates import SliceRates, lra_factors


def _model(name: str, shape: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor]:
    """A backbone with batch-norm statistics from one batch (eval mode is then not the identity)."""
    torch.manual_seed(0)
    if name == "pointnet_lite":
        m = search_spaces.create(name, num_classes=5, in_chans=3, width_mult=0.25, dropout=0.0)
    else:
        m = search_spaces.create(name, num_classes=10, in_chans=1, input_size=8, width_mult=0.125)
    x = torch.randn(*shape)
    m.train()
    with torch.no_grad():
        m(x)
    return m.eval(), x


@pytest.mark.parametrize("name, shape", [("mobilenetv1_cifar_025", (32, 1, 8, 8)), ("pointnet_lite", (16, 3, 40))])
def test_vt_growth_keeps_the_function_in_eval_and_train_mode(name, shape):
    m, x = _model(name, shape)
    ref, ref_train = m(x).detach(), copy.deepcopy(m).train()(x).detach()
    rep = vt_grow(m, x[:2], vt_counts(m, x[:2], 0.3))
    assert rep.new_neurons > 0 and rep.beta and all(k % 2 == 0 for k in rep.added.values())
    out, out_train = m(x).detach(), copy.deepcopy(m).train()(x).detach()
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (out_train - ref_train).abs().max() <= 1e-5 * ref_train.abs().max()


@pytest.mark.parametrize("transfer", [True, False])
def test_variance_transfer_keeps_each_consumers_output_variance(transfer):
    """A random unit-variance batch through each rescaled consumer's weights: the output variance after growth
    (new columns included, as when the new neurons carry their own signal) is within 10 % of before; without
    variance transfer it grows by about F'/F."""
    m, x = _model("mobilenetv1_cifar_025", (32, 1, 8, 8))
    before = {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith("weight") and p.dim() == 4}
    vt_grow(m, x[:2], vt_counts(m, x[:2], 0.3), variance_transfer=transfer)
    mods = dict(m.named_modules())
    # dense consumers whose fan-in grew, with at least 16 old inputs (the new columns' own sampling noise on an
    # 8-input layer is about ±7 % of its output variance)
    grown = [n[:-7] for n, w in before.items() if mods[n[:-7]].groups == 1 and w.shape[1] >= 16
             and mods[n[:-7]].weight.shape[1] > w.shape[1]]
    assert len(grown) >= 5
    g = torch.Generator().manual_seed(1)
    ratios = []
    for n in grown:
        w0, w1 = before[n + ".weight"], mods[n].weight.detach()
        x0 = torch.randn(256, w0.shape[1], 4, 4, generator=g)
        x1 = torch.cat([x0, torch.randn(256, w1.shape[1] - w0.shape[1], 4, 4, generator=g)], 1)
        ratios.append((F.conv2d(x1, w1).var() / F.conv2d(x0, w0).var()).item())
    if transfer:
        assert all(abs(r - 1) < 0.1 for r in ratios), ratios
    else:
        assert np.median(ratios) > 1.1, ratios


def test_lra_scales_each_stage_slice_by_its_norm_ratio():
    m, x = _model("mobilenetv1_cifar_025", (32, 1, 8, 8))
    layer = "blocks.2.0.conv_pw"
    width = m.get_submodule(layer).weight.shape[0]
    vt_grow(m, x[:2], {layer: 2})
    vt_grow(m, x[:2], {layer: 1})
    stages = {layer: [0] * width + [1] * 4 + [2] * 2}
    w = m.get_submodule(layer).weight.detach().numpy().reshape(width + 6, -1)
    expect = {0: 1.0, 1: np.linalg.norm(w[width:width + 4]) / np.linalg.norm(w[:width]),
              2: np.linalg.norm(w[width + 4:]) / np.linalg.norm(w[:width])}
    factors = lra_factors(m, stages)
    assert factors[layer] == pytest.approx(expect, rel=1e-5)
    y = torch.randint(0, 10, (32,))
    plain = torch.autograd.grad(F.cross_entropy(m.train()(x), y), m.get_submodule(layer).weight)[0]
    rates = SliceRates()
    rates.set(m, x[:2], stages, factors)
    scaled = torch.autograd.grad(F.cross_entropy(m(x), y), m.get_submodule(layer).weight)[0]
    rates.remove()
    scale = torch.tensor([expect[t] for t in stages[layer]], dtype=torch.float32).view(-1, 1, 1, 1)
    torch.testing.assert_close(scaled, plain * scale)


def test_splitting_with_lra_labels_each_rounds_copies_and_scales_them():
    """``lra=True`` on a splitting method: a round's copies (appended channels) are its stage, the factor of each
    stage is ‖W_Δt‖ / ‖W_0‖ of the grown rows (numpy), and the copies' gradients are scaled by it."""
    from types import SimpleNamespace

    from nas_split.methods import create_method

    m, x = _model("mobilenetv1_cifar_025", (32, 1, 8, 8))
    y = torch.randint(0, 10, (32,))
    method = create_method("s2d", lra=True, grow_ratio=0.3)
    ctx = SimpleNamespace(example_inputs=x[:2], recipe=SimpleNamespace(seed=0), cost_model=None)
    widths = {n: mod.weight.shape[0] for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)}
    info = method.grow(ctx, m, [(x, y)], None, 1, None)
    assert method.rates.stages and info["lra"]
    for layer, labels in method.rates.stages.items():
        w = m.get_submodule(layer).weight.detach().numpy().reshape(len(labels), -1)
        lab = np.array(labels)
        assert (lab == 0).sum() == widths[layer] and (lab == 1).sum() == w.shape[0] - widths[layer] > 0
        expect = np.linalg.norm(w[lab == 1]) / np.linalg.norm(w[lab == 0])
        assert info["lra"][layer]["1"] == pytest.approx(expect, rel=1e-5)
    layer = next(iter(method.rates.stages))
    weight = m.get_submodule(layer).weight
    scaled = torch.autograd.grad(F.cross_entropy(m.train()(x), y), weight)[0]
    method.rates.remove()
    plain = torch.autograd.grad(F.cross_entropy(m(x), y), weight)[0]
    factor = torch.tensor([info["lra"][layer][str(t)] for t in method.rates.stages[layer]]).view(-1, 1, 1, 1)
    torch.testing.assert_close(scaled, plain * factor)


def test_splitting_with_variance_transfer_rescales_consumers_and_keeps_the_function():
    """``variance_transfer=True`` on a splitting method: the same splits as without it; every consumer whose fan-in
    grew from F to F' (with a batch norm after it) has weights and bias β = sqrt(F / F') times those of the run
    without, its norm's running mean β times, running variance and ε β² times; the function is unchanged in eval
    and in train mode."""
    from types import SimpleNamespace

    from nas_split.growth.neurons import find_neurons
    from nas_split.methods import create_method

    m, x = _model("mobilenetv1_cifar_025", (32, 1, 8, 8))
    m, x = m.double(), x.double()  # float64: the function is kept to rounding
    y = torch.randint(0, 10, (32,))
    ref, ref_train = m(x).detach(), copy.deepcopy(m).train()(x).detach()
    ctx = SimpleNamespace(example_inputs=x[:2], recipe=SimpleNamespace(seed=0), cost_model=None)
    grown = {}
    for transfer in (False, True):
        grown[transfer] = copy.deepcopy(m)
        info = create_method("s2d", grow_ratio=0.3, eps=1e-6, variance_transfer=transfer).grow(
            ctx, grown[transfer], [(x, y)], None, 1, None)
    plain, vt = dict(grown[False].named_modules()), dict(grown[True].named_modules())
    betas = info["variance_transfer"]
    assert len(betas) >= 3
    before = dict(m.named_modules())
    for name, b in betas.items():
        f, f_new = before[name].weight.shape[1], vt[name].weight.shape[1]
        assert f_new > f and b == pytest.approx((f / f_new) ** 0.5, rel=1e-12)
        torch.testing.assert_close(vt[name].weight, b * plain[name].weight, rtol=1e-6, atol=0)
        n_vt, n_plain = (find_neurons(g, x[:2], [name])[name].norm for g in (grown[True], grown[False]))
        torch.testing.assert_close(n_vt.running_var, b * b * n_plain.running_var, rtol=1e-6, atol=0)
        torch.testing.assert_close(n_vt.running_mean, b * n_plain.running_mean, rtol=1e-6, atol=0)
        assert n_vt.eps == pytest.approx(b * b * n_plain.eps)
    for mod in (grown[True], grown[False]):
        out, out_train = mod(x).detach(), copy.deepcopy(mod).train()(x).detach()
        assert (out - ref).abs().max() <= 1e-7 * ref.abs().max()  # eps = 1e-6: the split moves it by O(eps²)
        assert (out_train - ref_train).abs().max() <= 1e-7 * ref_train.abs().max()


def test_mup_scales_the_input_and_output_layers_by_their_width_ratios():
    """``vt`` with ``mup=True``: after growth the stem's gradients are ``fan_out / fan_out_0`` and the classifier's
    ``fan_in_0 / fan_in`` times those of the same model without the scales (autograd); hidden layers keep theirs."""
    from types import SimpleNamespace

    from nas_split.methods import create_method

    m, x = _model("mobilenetv1_cifar_025", (32, 1, 8, 8))
    y = torch.randint(0, 10, (32,))
    stem0, cls0 = m.conv_stem.out_channels, m.classifier.in_features
    method = create_method("vt", mup=True, lra=False, grow_ratio=0.5)
    ctx = SimpleNamespace(example_inputs=x[:2], recipe=SimpleNamespace(seed=0), cost_model=None)
    info = method.grow(ctx, m, [(x, y)], None, 1, None)
    f_stem, f_cls = m.conv_stem.out_channels / stem0, cls0 / m.classifier.in_features
    assert f_stem > 1 > f_cls and info["mup"] == pytest.approx({"conv_stem": f_stem, "classifier": f_cls})
    params = [m.conv_stem.weight, m.classifier.weight, m.classifier.bias, m.blocks[1][0].conv_pw.weight]
    scaled = torch.autograd.grad(F.cross_entropy(m.train()(x), y), params)
    method.layer_rates.remove()
    plain = torch.autograd.grad(F.cross_entropy(m(x), y), params)
    for g, p, f in zip(scaled, plain, (f_stem, f_cls, f_cls, 1.0), strict=True):
        torch.testing.assert_close(g, p * f)
    assert method.state_dict()["mup_base"] == {"conv_stem": [stem0, 1], "classifier": [10, cls0]}
