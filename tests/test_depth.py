"""Growing in depth: function-preserving insertion (residual and Net2DeeperNet identity), timm citizenship, export
in a fresh process, Firefly's depth score against a finite difference, and a mixed width + depth budget cut."""
import copy
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import nas_split as ns
import search_spaces
from baselines.firefly import firefly_candidates
from nas_split.cost import count_macs
from nas_split.errors import NasSplitError
from nas_split.growth.depth import Site, deepen, in_insertion_order, insertion_sites, mixed_prefix_within_macs
from nas_split.growth.depth_scores import DepthCandidate, apply_depth, depth_candidates, select_within_macs
from nas_split.surgery import NewChannels, add_channels, growable_layers, layer_sizes
from nas_split.surgery.blocks import renamer
from nas_split.surgery.rebuild import fresh_model


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A float64 backbone and a batch of 4 for it."""
    if name == "mobilenetv2_050":
        return timm.create_model(name, pretrained=False, num_classes=10).double(), torch.randn(4, 3, 32, 32).double()
    if name == "pointnet_lite":
        return search_spaces.create(name, 10, 3, 64).double(), torch.randn(4, 3, 64).double()
    size = 8 if "cifar" in name else 16  # small-input variants: stride 2 at 8 px, 4x4 maps at the end
    return search_spaces.create(name, 10, 3, size).double(), torch.randn(4, 3, size, size).double()


def _outputs(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    m = copy.deepcopy(model).train(mode == "train")
    torch.manual_seed(1)  # the same dropout masks for both models
    with torch.no_grad():
        return m(x)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# sites picked to cover every kind: MobileNetV2's first stage (a 'ds' block with a skip), a stage's first and last
# block (inverted residuals); MobileNetV1 'dsa' blocks (identity pairs); PointNet's shared MLP and head
CASES = {"mobilenetv2_050": (0, 1, 4, 16), "mobilenetv2_cifar_050": (0, 2, 12),
         "mobilenetv1_cifar_025": (0, 1, 12), "pointnet_lite": (0, 3, 6)}


@pytest.mark.parametrize("name", list(CASES))
def test_insertion_keeps_the_function_in_eval_and_train_mode(name):
    model, x = _model(name)
    base = copy.deepcopy(model)
    chosen = [insertion_sites(model)[i] for i in CASES[name]]
    for site in in_insertion_order(chosen):
        deepen(model, site, x)
    assert len(layer_sizes(model)) > len(layer_sizes(base))
    for mode in ("eval", "train"):  # train mode: on the batch the identity norms were set on
        assert _rel(_outputs(model, x, mode), _outputs(base, x, mode)) < 1e-5, mode
    # another batch in train mode: residual blocks are exact on any batch, identity norms only on theirs
    other = torch.randn_like(x)
    err = _rel(_outputs(model, other, "train"), _outputs(base, other, "train"))
    assert err < 1e-12 if name.startswith("mobilenetv2") else err > 1e-6


def test_new_blocks_are_built_as_timm_builds_the_stage():
    model, x = _model("mobilenetv2_050")
    first, last = Site("blocks.0", 0), Site("blocks.2", 2)
    deepen(model, last, x)
    deepen(model, first, x)
    ir, ds = model.blocks[2][3], model.blocks[0][1]
    assert type(ir).__name__ == "InvertedResidual" and ir.has_skip and ir.conv_pw.out_channels == 6 * 16
    assert torch.count_nonzero(ir.bn3.weight) + torch.count_nonzero(ir.bn3.bias) == 0
    assert type(ds).__name__ == "DepthwiseSeparableConv" and ds.has_skip and not ds.has_pw_act
    v1, x1 = _model("mobilenetv1_cifar_025")
    deepen(v1.eval(), Site("blocks.1", 0), x1)
    dsa = v1.blocks[1][1]
    assert not dsa.has_skip and dsa.has_pw_act and type(dsa.bn1.act).__name__ == "ReLU6"
    assert not dsa.training and ir.training  # new blocks take their stage's mode
    assert torch.equal(dsa.conv_pw.weight[:, :, 0, 0], torch.eye(dsa.conv_pw.in_channels, dtype=torch.float64))
    assert model.nas_split_depth == {"stage_depths": [2, 2, 4, 4, 3, 3, 1]}


def test_deepening_is_refused_where_it_would_change_the_function():
    model = search_spaces.create("mobilenetv1_cifar_025", 10, 3, 16, act_layer="silu")
    assert insertion_sites(model) == []  # SiLU(SiLU(u)) != SiLU(u): no identity 'dsa' block
    with pytest.raises(NasSplitError, match="not idempotent"):
        deepen(model, Site("blocks.1", 0), torch.randn(2, 3, 16, 16))
    pn, x = _model("pointnet_lite")
    with pytest.raises(NasSplitError, match="pass one"):  # an identity layer's norms need a batch
        deepen(pn, insertion_sites(pn)[0])


@pytest.mark.parametrize("name", ["mobilenetv2_cifar_050", "pointnet_lite"])
def test_the_new_layers_are_growable(name):
    model, x = _model(name)
    site = insertion_sites(model)[2]
    old = set(layer_sizes(model))
    new = deepen(model, site, x)
    growable = growable_layers(model, x, trusted=old)  # a trial split verifies the new layers
    inside = sorted(n for n in growable if any(n == m or n.startswith(f"{m}.") for m in new))
    expected = {"mobilenetv2_cifar_050": [f"{new[0]}.conv_pw", f"{new[0]}.conv_pwl"], "pointnet_lite": [new[0]]}
    assert inside == expected[name]
    before = layer_sizes(model)[inside[0]][0]
    add_channels(model, x, {inside[0]: NewChannels(3)})  # and a width method grows them
    assert layer_sizes(model)[inside[0]][0] == before + 3


def test_feature_levels_stay_timm_s():
    model, x = _model("mobilenetv2_cifar_050")
    base = copy.deepcopy(model).eval()
    for site in in_insertion_order(insertion_sites(model)[::3]):
        deepen(model, site, x)
    assert [dict(e) for e in model.feature_info] == [dict(e) for e in base.feature_info]
    with torch.no_grad():
        got, ref = search_spaces.features(model.eval())(x), search_spaces.features(base)(x)
    assert [t.shape for t in got] == [t.shape for t in ref]
    assert max(_rel(a, b) for a, b in zip(got, ref, strict=True)) < 1e-12
    # the record rebuilds as timm builds the registered model at the new depths
    native = search_spaces.create("mobilenetv2_cifar_050", 10, 3, 8, depths=model.nas_split_depth["stage_depths"])
    assert layer_sizes(native) == layer_sizes(model)
    fresh = fresh_model({**model.nas_split_spec, **model.nas_split_depth}, layer_sizes(model), seed=0)
    assert layer_sizes(fresh) == layer_sizes(model)


def test_a_deepened_model_reloads_identically_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = timm.create_model("mobilenetv2_050", pretrained=False, num_classes=6)
    for site in in_insertion_order([Site("blocks.0", 0), Site("blocks.3", 1), Site("blocks.3", 3)]):
        deepen(model, site, x)
    add_channels(model, x, {"blocks.3.2.conv_pw": NewChannels(5), "blocks.0.0.conv_pw": NewChannels(2)})
    for p in model.parameters():  # weights that the deepening's zeros do not hide
        p.data.add_(0.01 * torch.randn_like(p))
    pn = search_spaces.create("pointnet_lite", 10, 3, 64)
    pts = torch.randn(2, 3, 64)
    for site in in_insertion_order(insertion_sites(pn)[1:4]):
        deepen(pn, site, pts)
    model.eval(), pn.eval()
    ns.save_grown(model, tmp_path / "mbv2.pt")
    ns.save_grown(pn, tmp_path / "pn.pt")
    torch.save({"x": x, "pts": pts}, tmp_path / "in.pt")
    with torch.no_grad():
        torch.save({"mbv2": model(x), "pn": pn(pts)}, tmp_path / "ref.pt")
    code = (f"import torch, nas_split as ns; d = r'{tmp_path}'; i = torch.load(d + '/in.pt'); "
            "r = torch.load(d + '/ref.pt'); m = ns.load_grown(d + '/mbv2.pt').eval(); "
            "p = ns.load_grown(d + '/pn.pt').eval(); "
            "print(torch.equal(m(i['x']), r['mbv2']), torch.equal(p(i['pts']), r['pn']), "
            "[len(s) for s in m.blocks])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "True", "[2,", "2,", "3,", "6,", "3,", "3,", "1]"]
    spec = torch.load(tmp_path / "mbv2.pt", weights_only=True)["spec"]
    assert spec == {"timm": "mobilenetv2_050", "kwargs": {"num_classes": 6, "in_chans": 3},
                    "stage_depths": [2, 2, 3, 6, 3, 3, 1]}
    assert torch.load(tmp_path / "pn.pt", weights_only=True)["spec"]["inserted_layers"] == \
        [["features", 5], ["features", 2], ["stem", 5]]


def _loader(x: torch.Tensor, classes: int = 10, n: int = 2):
    g = torch.Generator().manual_seed(3)
    return [(x + 0.1 * torch.randn(x.shape, generator=g, dtype=x.dtype), torch.randint(classes, (len(x),),
                                                                                        generator=g))
            for _ in range(n)]


def _gated_loss(model: nn.Module, cand: DepthCandidate, loader, s: float) -> float:
    """The mean loss over ``loader`` with ``cand``'s block behind gate ``s``, built here from its definition:
    y -> y + s (B(y) - y), the network in eval mode, the block's norms on batch statistics."""
    block = nn.Sequential(*copy.deepcopy(cand.modules)).train()
    hook = dict(model.named_modules())[cand.site.child].register_forward_hook(
        lambda _m, _i, y: y + s * (block(y) - y))
    try:
        with torch.no_grad():
            return sum(float(F.cross_entropy(model.eval()(x), y)) for x, y in loader) / len(loader)
    finally:
        hook.remove()


def _trained_norms(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Norms as a trained network has them: statistics of the data (``x``), random scales and positive shifts.

    At timm's initialisation (shifts 0) a unit whose inputs are all exact zeros of a ReLU sits exactly at its kink,
    and a channel that a ReLU zeroes at every point ties PointNet's max-pool; there the loss in the gate of an
    identity block has two one-sided derivatives, and no finite difference converges to the score."""
    g = torch.Generator().manual_seed(5)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: the statistics of x
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype))
            m.bias.copy_(0.5 + torch.rand(m.bias.shape, generator=g, dtype=m.bias.dtype))
        model.train()(x)
    for m in norms:
        m.momentum = 0.1
    return model.eval()


@pytest.mark.parametrize("name", ["test_mobilenetv2", "test_mobilenetv1", "pointnet_lite"])
def test_the_depth_score_is_the_derivative_of_the_loss_in_the_gate(name):
    model = search_spaces.create(name, 10, 3, 16 if "mobilenet" in name else 32).double()
    x = torch.randn(8, 3, *((16, 16) if "mobilenet" in name else (32,))).double()
    _trained_norms(model, x)
    loader = _loader(x)
    ref = _outputs(model, x, "eval")
    cands = depth_candidates(model, loader, steps=2)
    assert len(cands) == len(insertion_sites(model)) and all(c.macs > 0 for c in cands)
    assert torch.equal(_outputs(model, x, "eval"), ref)  # the model is left as it was
    h = 1e-7  # below the distance to the nearest kink of the ReLUs downstream
    for c in cands:
        fd = (_gated_loss(model, c, loader, h) - _gated_loss(model, c, loader, -h)) / (2 * h)
        assert abs(c.score) > 1e-6 and abs(c.score - fd) <= 1e-3 * abs(fd), (c.site, c.score, fd)
    c = cands[0]  # the MACs a candidate says it adds are the deepened model's extra MACs
    deep = copy.deepcopy(model)
    apply_depth(deep, [c], x)
    assert count_macs(deep, x)[0] - count_macs(model, x)[0] == c.macs


def _applied_macs(model: nn.Module, x: torch.Tensor, items) -> int:
    """MACs once ``items`` are applied as mixed_prefix_within_macs counts them: blocks first, then channels."""
    deep = copy.deepcopy(model)
    where = [i for i in items if isinstance(i, Site)]
    rename = renamer(model, where)
    for site in in_insertion_order(where):
        deepen(deep, site, x)
    widths = {}
    for i in items:
        if not isinstance(i, Site):
            widths[rename(i[0])] = widths.get(rename(i[0]), 0) + i[1]
    if widths:
        add_channels(deep, x, {layer: NewChannels(n) for layer, n in widths.items()})
    return count_macs(deep, x)[0]


@pytest.mark.parametrize("name", ["test_mobilenetv2", "pointnet_lite"])
def test_a_mixed_budget_cut_is_exact_cross_terms_included(name):
    model, x = _model(name)
    model, x = model.float(), x.float()
    # a block, then the residual stream it joins (MobileNetV2's stage 2) or the layer it follows (PointNet) is
    # widened: the new block widens with it
    items = {"test_mobilenetv2": [Site("blocks.2", 1), ("blocks.2.0.conv_pwl", 4), ("blocks.3.0.conv_pw", 8),
                                  Site("blocks.1", 0), ("blocks.2.1.conv_pw", 8), Site("blocks.2", 0)],
             "pointnet_lite": [Site("features", 5), ("features.3", 4), ("stem.0", 8), Site("classifier", 2),
                               ("features.0", 8), Site("features", 2)]}[name]
    ks = (0, 1, 2, 4, len(items))  # k = 2: the block and the width it takes
    macs = {k: _applied_macs(model, x, items[:k]) for k in ks}
    assert list(macs.values()) == sorted(set(macs.values()))
    # the cross term is there: the width costs more in MobileNetV2 (the new block widens with its stream) and less
    # in PointNet (the new layer, not the next one, reads the widened output)
    assert macs[2] - macs[1] != _applied_macs(model, x, items[1:2]) - macs[0]
    for k in ks[1:]:
        assert mixed_prefix_within_macs(model, x, items, macs[k]) == k
        assert mixed_prefix_within_macs(model, x, items, macs[k] - 1) == k - 1


def test_a_mixed_firefly_selection_lands_under_its_cap():
    model, x = _model("test_mobilenetv2")
    model, x = model.float(), x.float()
    loader = _loader(x)
    width = firefly_candidates(model, x, loader, k=2, steps=2)
    scores = {}
    for n, c in width.items():
        scores.update({(n, "split", i): float(v) for i, v in enumerate(c.split_scores)})
    depth = depth_candidates(model, loader, steps=2)
    ranking = select_within_macs(model, x, scores, depth, float("inf"))  # every negative score, best first
    assert all(isinstance(c, DepthCandidate) or scores[c] < 0 for c in ranking)
    gains = [-c.score / c.macs for c in ranking if isinstance(c, DepthCandidate)]
    assert gains == sorted(gains, reverse=True) and gains[-1] > 0
    items = [c.site if isinstance(c, DepthCandidate) else (c[0], 1) for c in ranking]
    first_block = next(i for i, c in enumerate(ranking) if isinstance(c, DepthCandidate))
    assert first_block < len(ranking) - 1
    cap = _applied_macs(model, x, items[:first_block + 1]) + 0.5  # a budget whose cut takes a block
    chosen = select_within_macs(model, x, scores, depth, cap)
    k = len(chosen)
    assert chosen == ranking[:k] and k > first_block
    assert _applied_macs(model, x, items[:k]) <= cap < _applied_macs(model, x, items[:k + 1])
