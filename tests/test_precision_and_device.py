"""Growth computes in fp32 on the model's device, whatever the precision settings; the training loop's fast paths
give the batches and results of the plain ones.

The CPU stand-in for TF32 is bf16 autocast: without :func:`nas_split.numerics.full_precision` it moves exact
splitting matrices by tens of percent (shown below by calling the unguarded function), with it they are
bit-identical to fp32.  Tests marked ``gpu`` run where CUDA is present (``benchmarks/gpu_check.sh``).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import nas_split as ns
import search_spaces
from nas_split.data import create_dataset
from nas_split.growth.channel_cost import channel_costs
from nas_split.growth.neurons import splittable_layers
from nas_split.numerics import full_precision
from nas_split.splitting.analysis import fast_spectrum, splitting_matrices
from nas_split.surgery import CouplingGraph
from nas_split.training import DeviceBatches, TrainConfig, Trainer

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = search_spaces.create("test_mobilenetv1", num_classes=10, in_chans=1, input_size=16)
    x, y = torch.randn(24, 1, 16, 16), torch.randint(0, 10, (24,))
    return model, x, y


def test_full_precision_switches_off_autocast_and_restores_it():
    a = torch.randn(8, 8)
    with torch.autocast(**BF16):
        assert (a @ a).dtype == torch.bfloat16
        with full_precision():
            assert (a @ a).dtype == torch.float32
            assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert (a @ a).dtype == torch.bfloat16
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"  # PyTorch's default, restored


def test_exact_matrices_under_autocast_equal_fp32(net):
    model, x, y = net
    neurons = splittable_layers(model, x)
    ref = splitting_matrices(model, [(x, y)], neurons, F.cross_entropy)
    with torch.autocast(**BF16):
        got = splitting_matrices(model, [(x, y)], neurons, F.cross_entropy)
        unguarded = splitting_matrices.__wrapped__(model, [(x, y)], neurons, F.cross_entropy)
    worst = max(((unguarded[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref)
    assert worst > 1e-2  # bf16 really would corrupt the analysis ...
    for k in ref:  # ... and the guard keeps it exact
        assert torch.equal(got[k], ref[k])


def test_fast_spectrum_and_growability_under_autocast_equal_fp32(net):
    model, x, y = net
    neurons = splittable_layers(model, x)

    def fast():
        return fast_spectrum(model, [(x, y)], neurons, F.cross_entropy, passes=2, max_batches=1,
                             generator=torch.Generator().manual_seed(3))

    ref, layers = fast(), ns.growable_layers(model, x)
    graph = CouplingGraph(model, x)
    costs = channel_costs(model, x, {n: graph.group(n) for n in neurons})
    with torch.autocast(**BF16):
        got, got_layers = fast(), ns.growable_layers(model, x)
        got_costs = channel_costs(model, x, {n: graph.group(n) for n in neurons})
    assert got_layers == layers and len(layers) == 6
    assert got_costs == costs
    for k in ref:
        assert torch.equal(got[k].lam_min, ref[k].lam_min) and torch.equal(got[k].v_min, ref[k].v_min)
        assert got[k].lam_min.dtype == torch.float32


def test_grower_step_under_autocast_matches_fp32(net):
    model, x, y = net
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = ns.Grower(a, x, "s2d", grow_ratio=0.5, seed=1).step([(x, y)])
    with torch.autocast(**BF16):
        rb = ns.Grower(b, x, "s2d", grow_ratio=0.5, seed=1).step([(x, y)])
    assert ra.widths == rb.widths and ra.predicted_change == rb.predicted_change


@pytest.mark.parametrize("drop_last", [True, False])
def test_device_batches_are_the_loaders_batches(drop_last):
    ds = TensorDataset(torch.randn(103, 3, 4, 4), torch.arange(103))
    loader = DataLoader(ds, 16, shuffle=True, generator=torch.Generator().manual_seed(5), drop_last=drop_last)
    twin = DataLoader(ds, 16, shuffle=True, generator=torch.Generator().manual_seed(5), drop_last=drop_last)
    fast = DeviceBatches(twin, torch.device("cpu"), torch.channels_last)
    assert DeviceBatches.supports(twin) and len(fast) == len(loader)
    for _ in range(3):  # epochs: the generator advances the same way
        got = list(fast)
        want = list(loader)
        assert len(got) == len(want)
        for (gx, gy), (wx, wy) in zip(got, want, strict=True):
            assert torch.equal(gy, wy) and torch.equal(gx, wx) and gx.is_contiguous(memory_format=torch.channels_last)
    assert not DeviceBatches.supports(DataLoader(ds, 16, num_workers=1))


def _fit(epochs=2, **over):
    data = create_dataset("digits", seed=0)
    cfg = TrainConfig(epochs=epochs, seed=3, progress=False, lr=0.05, **over)
    torch.manual_seed(0)
    model = search_spaces.create("test_mobilenetv1", 10, 1, input_size=8)
    tr, va, _ = data.loaders(64, seed=3)
    return Trainer(cfg).fit(model, tr, va).history, model


def test_device_data_gives_the_same_training_as_the_loader():
    fast, _ = _fit(device_data=True, channels_last=False)
    slow, _ = _fit(device_data=False, channels_last=False)
    assert [h["train_loss"] for h in fast] == [h["train_loss"] for h in slow]
    assert [h["val_acc"] for h in fast] == [h["val_acc"] for h in slow]


def test_channels_last_is_the_default_for_conv_nets_and_trains_alike(two_threads):
    assert Trainer(TrainConfig(progress=False)).memory_format(search_spaces.create("test_mobilenetv1", 10, 1, 8)) \
        == torch.channels_last
    assert Trainer(TrainConfig(progress=False)).memory_format(search_spaces.create("test_mlp", 10, 1, 8)) \
        == torch.contiguous_format
    _, plain = _fit(channels_last=True, epochs=1)
    x = torch.randn(8, 1, 8, 8)
    model = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    outs = []
    for m, xx in ((model, x.contiguous(memory_format=torch.channels_last)), (plain, x)):
        out = m(xx)
        grads = torch.autograd.grad(out.square().sum(), list(m.parameters()))
        outs.append((out, grads))
    (o1, g1), (o2, g2) = outs  # other conv kernels, the same maths: float rounding only
    assert torch.allclose(o1, o2, rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g1, g2, strict=True))


def test_a_non_finite_loss_is_found_at_the_next_check():
    from nas_split.errors import DivergedError

    data = create_dataset("digits", seed=0)
    model = search_spaces.create("test_mlp", 10, 1, input_size=8)
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    tr, _, _ = data.loaders(64, seed=0)
    with pytest.raises(DivergedError, match="by step 5"):
        Trainer(TrainConfig(epochs=1, progress=False, check_every=5)).fit(model, tr)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run benchmarks/gpu_check.sh on a GPU)")


@pytest.mark.gpu
@cuda
def test_gpu_growable_layers_and_lambda_equal_cpu_under_default_tf32():
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # PyTorch's default for convolutions
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        torch.manual_seed(0)
        cpu = search_spaces.create("mobilenetv1_cifar_025", num_classes=10, in_chans=1, input_size=28,
                                   width_mult=0.125)
        gpu = copy.deepcopy(cpu).cuda()
        x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
        assert ns.growable_layers(gpu, x) == ns.growable_layers(cpu, x) and len(ns.growable_layers(cpu, x)) == 14
        neurons_c, neurons_g = splittable_layers(cpu, x), splittable_layers(gpu, x)
        sc = splitting_matrices(cpu, [(x, y)], neurons_c, F.cross_entropy)
        sg = splitting_matrices(gpu, [(x, y)], neurons_g, F.cross_entropy)
        for k in sc:
            lc, lg = torch.linalg.eigvalsh(sc[k]), torch.linalg.eigvalsh(sg[k].cpu())
            assert ((lg - lc).abs().max() / lc.abs().max()).item() < 1e-3
        gen = [torch.Generator().manual_seed(2) for _ in range(2)]
        fc = fast_spectrum(cpu, [(x, y)], neurons_c, F.cross_entropy, passes=2, max_batches=1, generator=gen[0])
        fg = fast_spectrum(gpu, [(x, y)], neurons_g, F.cross_entropy, passes=2, max_batches=1, generator=gen[1])
        for k in fc:
            assert ((fg[k].lam_min.cpu() - fc[k].lam_min).abs().max() / fc[k].lam_min.abs().max()).item() < 1e-3
    finally:
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.backends.cuda.matmul.fp32_precision = "none"


@pytest.mark.gpu
@cuda
def test_gpu_growth_stays_on_the_device():
    torch.manual_seed(0)
    model = search_spaces.create("test_mobilenetv1", num_classes=10, in_chans=1, input_size=16).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    model(x.cuda()).sum().backward()
    opt.step()
    ns.Grower(model, x, "s3d", grow_ratio=0.5, optimizer=opt).step([(x, y)])
    assert all(p.is_cuda for p in model.parameters())
    assert all(t.is_cuda for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("method", ["fast", "prune-l1"])
def test_gpu_two_round_run_and_grow_resume(tmp_path, method):
    from nas_split.cli import main

    common = ["--dataset", "digits", "--backbone", "mobilenetv1_cifar_025", "--epochs", "1", "--no-progress",
              "--no-latency", "--set", "train.accelerator=cuda"]
    assert main(["run", *common, "--method", method, "--rounds", "2", "--seed-width-mult", "0.125",
                 "--target-mmacs", "4", "--out", str(tmp_path / "run")]) == 0
    grow = [*common, "--width-mult", "0.125", "--rounds", "2", "--method", "fast", "--out", str(tmp_path / "g")]
    assert main(["grow", *grow]) == 0
    (tmp_path / "g" / "checkpoints" / "stage2.pt").unlink()
    ref = (tmp_path / "g" / "results.json").read_text()
    assert main(["grow", "--resume", str(tmp_path / "g"), "--no-progress"]) == 0
    import json

    widths = [s["widths"] for s in json.loads(ref)["stages"]]
    assert [s["widths"] for s in json.loads((tmp_path / "g" / "results.json").read_text())["stages"]] == widths
