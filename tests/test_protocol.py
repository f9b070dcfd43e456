"""The search → export → retrain protocol's parts: paired confidence intervals, training-MAC accounting, fresh
architectures from widths, random architectures at a MAC budget, and ``nas-split retrain`` on a grow run."""
import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch_pruning as tp
from scipy import stats
from torch import nn

import search_spaces
from baselines.scratch import random_widths
from nas_split.cli import main
from nas_split.cost import PassCounter, count_macs, input_gradients_only
from nas_split.report import paired_ci
from nas_split.surgery import NewChannels, add_channels, apply_sizes, layer_sizes, layer_widths, load_grown, save_grown
from nas_split.surgery.rebuild import fresh_model, resized_sizes, width_groups


@pytest.mark.parametrize("n", [2, 3, 7])
def test_paired_ci_equals_scipy(n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(85, 1, n), rng.normal(84.5, 1, n)
    ci = paired_ci(list(a), list(b))
    ref = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert ci.mean == pytest.approx(float(np.mean(a - b)), abs=1e-12)
    assert (ci.low, ci.high) == pytest.approx((ref.low, ref.high), abs=1e-9)
    assert ci.excludes_zero == (ref.low > 0 or ref.high < 0)
    ci90 = paired_ci(list(a), list(b), level=0.9)
    assert (ci90.low, ci90.high) == pytest.approx(tuple(stats.ttest_rel(a, b).confidence_interval(0.9)), abs=1e-9)


def test_paired_ci_needs_two_pairs_of_equal_length():
    assert paired_ci([1.0], [0.5]) is None
    with pytest.raises(ValueError, match="differ in length"):
        paired_ci([1.0, 2.0], [1.0])


def test_pass_counter_hand_value():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))  # 4*3 + 3*2 = 18 MACs per sample
    assert count_macs(model, torch.zeros(1, 4))[0] == 18
    with PassCounter(model) as passes:
        for _ in range(3):
            model(torch.zeros(5, 4)).sum().backward()
        with torch.no_grad():
            model(torch.zeros(7, 4))
        with input_gradients_only():  # a backward without weight gradients follows
            model(torch.zeros(2, 4))
    model(torch.zeros(11, 4))  # outside the block: not counted
    assert (passes.with_grad, passes.input_grad, passes.without_grad) == (15, 2, 7)
    assert passes.macs(18) == 3 * 15 * 18 + 2 * 2 * 18 + 7 * 18


def _mbv1():
    torch.manual_seed(0)
    return search_spaces.create("mobilenetv1_cifar_025", 10, in_chans=1, input_size=28, width_mult=0.0625), \
        torch.randn(2, 1, 28, 28)


def test_resized_sizes_equal_a_real_widening_and_a_real_pruning():
    model, x = _mbv1()
    groups = width_groups(model, x)
    assert "classifier" not in groups and len(groups) == 14
    wide = {"blocks.3.0.conv_pw": groups["blocks.3.0.conv_pw"] + 5, "conv_stem": groups["conv_stem"] + 2}
    grown = copy.deepcopy(model)
    add_channels(grown, x, {k: NewChannels(v - groups[k]) for k, v in wide.items()})
    assert resized_sizes(model, x, wide) == layer_sizes(grown)
    # narrowing: Torch-Pruning removes 3 channels of blocks.4.0's pointwise conv (the flatten-free classifier
    # input follows) and one of the stem
    pruned = copy.deepcopy(model)
    dg = tp.DependencyGraph().build_dependency(pruned, x)
    mods = dict(pruned.named_modules())
    for name, idxs in (("blocks.4.0.conv_pw", [0, 1, 2]), ("conv_stem", [5])):
        dg.get_pruning_group(mods[name], tp.prune_conv_out_channels, idxs).prune()
    narrow = {"blocks.4.0.conv_pw": groups["blocks.4.0.conv_pw"] - 3, "conv_stem": groups["conv_stem"] - 1}
    assert resized_sizes(model, x, narrow) == layer_sizes(pruned)


def test_layer_widths_are_the_output_channels_of_every_conv_and_linear_layer():
    model, _ = _mbv1()
    widths = layer_widths(model)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    assert widths == {n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features) for n, m in convs.items()}
    assert all(layer_sizes(model)[n][0] == w for n, w in widths.items())


def test_resized_sizes_through_a_flatten_count_every_position():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    x = torch.randn(2, 1, 6, 6)
    sizes = resized_sizes(model, x, {"0": 7})
    assert sizes["0"] == [7, 1] and sizes["3"] == [3, 7 * 16]  # 16 positions per channel after the flatten
    assert fresh_model({"factory": "f", "kwargs": {}}, sizes, 0, factories={"f": lambda: copy.deepcopy(model)})(
        x).shape == (2, 3)


def test_fresh_model_has_the_sizes_and_the_constructors_initialisation():
    model, x = _mbv1()
    widths = {k: 2 * v + 1 for k, v in width_groups(model, x).items()}
    sizes = resized_sizes(model, x, widths)
    fresh = fresh_model(model.nas_split_spec, sizes, seed=3)
    assert layer_sizes(fresh) == sizes
    assert all(layer_widths(fresh)[k] == v for k, v in widths.items())
    # timm's init (what EfficientNet's constructor does): conv ~ N(0, 2 / fan_out), BN identity, fresh statistics
    w = fresh.get_submodule("blocks.3.0.conv_pw").weight
    fan_out = w.shape[0]
    assert w.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    bn = fresh.get_submodule("blocks.3.0.bn2")
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.running_var,
                                                                              torch.ones_like(bn.running_var))
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    again = fresh_model(model.nas_split_spec, sizes, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), again.state_dict().values(),
                                                 strict=True))
    other = fresh_model(model.nas_split_spec, sizes, seed=4)
    assert not torch.equal(other.conv_stem.weight, fresh.conv_stem.weight)


def test_fresh_model_keeps_constant_initialised_tensors():
    torch.manual_seed(0)
    net = search_spaces.create("pointnet", 5, in_chans=3, input_size=32, width_mult=0.125, input_transform=True)
    x = torch.randn(2, 3, 32)
    tnet_last = [n for n, m in net.named_modules() if n.startswith("input_tnet.head") and isinstance(m, nn.Linear)][-1]
    before = net.get_submodule(tnet_last)
    assert not before.weight.any()  # the T-Net starts at the identity transform
    groups = width_groups(net, x)
    widths = {k: v + 3 for k, v in groups.items()}
    sizes = resized_sizes(net, x, widths)
    fresh = fresh_model(net.nas_split_spec, sizes, seed=1)
    last = fresh.get_submodule(tnet_last)
    assert layer_sizes(fresh) == sizes and sizes[tnet_last] != layer_sizes(net)[tnet_last]
    assert not last.weight.any() and not last.bias.any()
    first = fresh.get_submodule("classifier.0")
    bound = 1 / math.sqrt(first.in_features)  # PyTorch's default Linear init
    assert first.weight.abs().max().item() <= bound and first.weight.abs().max().item() > 0.5 * bound


def test_fresh_model_is_the_same_in_every_process():
    code = ("import torch, search_spaces; from nas_split.surgery.rebuild import *; "
            "n = search_spaces.create('pointnet_lite', 5, in_chans=3, input_size=32, width_mult=0.125); "
            "x = torch.randn(2, 3, 32); s = resized_sizes(n, x, {k: v + 3 for k, v in width_groups(n, x).items()}); "
            "m = fresh_model(n.nas_split_spec, s, 0); print(sum(float(p.double().sum()) for p in m.parameters()))")
    sums = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": h}).stdout for h in ("1", "2")}
    assert len(sums) == 1  # set or dict-of-hash orders do not reach the random draws


def test_random_widths_log_uniform_around_the_seed_at_the_target():
    model, x = _mbv1()
    base = width_groups(model, x)
    target = 4e6
    w0 = random_widths(model, x, target, spread=2.0, rng_seed=0)
    assert w0 == random_widths(model, x, target, spread=2.0, rng_seed=0)
    assert w0 != random_widths(model, x, target, spread=2.0, rng_seed=1)
    ratios = [w0[k] / base[k] for k in base]
    assert max(ratios) / min(ratios) > 1.3  # not uniform
    # factors in [1/2, 2] times one scale: the ratio spread is at most 4 (up to rounding of small widths)
    assert max(ratios) / min(ratios) <= 4 * (1 + 1 / min(base.values())) ** 2
    grown = copy.deepcopy(model)
    apply_sizes(grown, resized_sizes(model, x, w0))
    macs = count_macs(grown, x)[0]
    assert abs(macs / target - 1) < 0.02


def test_retrain_cli_on_a_grow_run(tmp_path, capsys):
    run = tmp_path / "g"
    assert main(["grow", "--dataset", "digits", "--backbone", "mobilenetv1_cifar_025", "--width-mult", "0.125",
                 "--epochs", "1", "--seed-epochs", "2", "--rounds", "1", "--out", str(run), "--no-progress",
                 "--no-latency"]) == 0
    grown = json.loads((run / "results.json").read_text())
    ckpt = torch.load(run / "checkpoints" / "stage1.pt", weights_only=True)
    assert main(["retrain", str(run), "--no-progress", "--no-latency"]) == 0
    out = tmp_path / "g-retrain"
    res = json.loads((out / "results.json").read_text())
    (st,) = res["stages"]
    assert st["kind"] == "retrain" and st["widths"] == grown["stages"][-1]["widths"]
    assert st["epochs"] == grown["stages"][-1]["epochs_total"] == 3
    assert res["config"]["train"]["seed"] == grown["config"]["train"]["seed"]
    assert res["config"]["train"]["lr"] == grown["config"]["train"]["lr"]
    model = load_grown(out / "model.pt")
    assert layer_sizes(model) == ckpt["model"]["sizes"]
    # fresh weights: not the grown ones
    assert not torch.equal(model.state_dict()["conv_stem.weight"], ckpt["model"]["state_dict"]["conv_stem.weight"])
    # a checkpoint file says which run it belongs to: its dataset and recipe
    assert main(["retrain", str(run / "checkpoints" / "stage1.pt"), "--epochs", "1", "--no-progress",
                 "--no-latency", "--out", str(tmp_path / "c")]) == 0
    res = json.loads((tmp_path / "c" / "results.json").read_text())
    assert res["stages"][0]["widths"] == grown["stages"][-1]["widths"] and res["stages"][0]["epochs"] == 1
    assert res["config"]["dataset"] == "digits"


def test_retrain_refuses_a_bare_model_file_without_a_dataset(tmp_path, capsys):
    model, _ = _mbv1()
    save_grown(model, tmp_path / "m.pt")
    assert main(["retrain", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --dataset" in err[0]
    assert not (tmp_path / "m-retrain").exists()
