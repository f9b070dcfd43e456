"""Training-step throughput of nas-split's loop against a plain PyTorch loop, and analysis time per epoch.

Run:  python benchmarks/bench_train.py [--device cpu|cuda] [--steps 20] [--repeats 5] [--json FILE]

The model is the issue's: ``mobilenetv1_cifar_025`` x0.125 at 28 px, one input channel, batch 128, SGD with
momentum, on Fashion-MNIST-shaped synthetic tensors (a ``TensorDataset``).  Every variant trains the same number
of steps from the same weights; repeats are interleaved (A, B, C, A, B, C, ...) and medians reported, and every
ratio is a ratio of medians measured in this run.  Variants:

* ``plain``: the loop anyone writes, batches sliced from tensors already on the device, contiguous format;
* ``plain-cl``: the same with ``channels_last`` model and inputs;
* ``nas-split``: :meth:`nas_split.training.Trainer.fit` with its defaults (device-resident batches drawn in the
  DataLoader's order, ``channels_last`` for conv nets, a finite-loss check every 50 steps);
* ``nas-split-loader``: the same loop with ``device_data=False, channels_last=False`` (a DataLoader per step);
* on CUDA also ``nas-split-bf16`` (``precision="bf16-mixed"``) and ``nas-split-compile`` (``compile=True``).

Analysis per epoch: one fast splitting analysis (its defaults: 20 batches x (3 + 1) passes) over the time of one
epoch of 60,000 samples at the measured nas-split step rate.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import nas_split as ns
import search_spaces
from nas_split.training import TrainConfig, Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_steps(model, x, y, steps: int, batch: int, device: torch.device, channels_last: bool) -> float:
    """Seconds for ``steps`` SGD steps of the plain loop (data already on the device)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()
    x, y = x.to(device).contiguous(memory_format=fmt), y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    n = x.shape[0]
    _sync(device)
    t = time.perf_counter()
    for s in range(steps):
        i = (s * batch) % (n - batch + 1)
        loss = F.cross_entropy(model(x[i:i + batch]), y[i:i + batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return time.perf_counter() - t


def nas_split_steps(model, x, y, steps: int, batch: int, device: torch.device, **recipe) -> float:
    """Seconds of ``Trainer.fit`` over exactly ``steps`` steps (one epoch of ``steps`` batches)."""
    loader = DataLoader(TensorDataset(x[:steps * batch], y[:steps * batch]), batch, shuffle=True,
                        generator=torch.Generator().manual_seed(0), drop_last=True)
    cfg = TrainConfig(epochs=1, lr=0.05, progress=False, accelerator=device.type, **recipe)
    trainer = Trainer(cfg)
    _sync(device)
    t = time.perf_counter()
    trainer.fit(model, loader)
    _sync(device)
    return time.perf_counter() - t


def analysis_seconds(model, x, y, batch: int, device: torch.device) -> float:
    """One fast analysis with the Grower's defaults on ``device``."""
    model = copy.deepcopy(model).to(device)
    loader = [(x[i:i + batch], y[i:i + batch]) for i in range(0, 20 * batch, batch)]
    g = ns.Grower(model, x[:2], "fast", grow_ratio=0.3)
    _sync(device)
    t = time.perf_counter()
    g.analyze(loader)
    _sync(device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--json", help="also write the figures to this file")
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    base = search_spaces.create("mobilenetv1_cifar_025", num_classes=10, in_chans=1, input_size=28,
                                width_mult=0.125)
    x = torch.randn(max(a.steps, 20) * a.batch, 1, 28, 28)
    y = torch.randint(0, 10, (x.shape[0],))
    variants = {
        "plain": lambda m: plain_steps(m, x, y, a.steps, a.batch, device, False),
        "plain-cl": lambda m: plain_steps(m, x, y, a.steps, a.batch, device, True),
        "nas-split": lambda m: nas_split_steps(m, x, y, a.steps, a.batch, device),
        "nas-split-loader": lambda m: nas_split_steps(m, x, y, a.steps, a.batch, device, device_data=False,
                                                      channels_last=False),
    }
    if device.type == "cuda":
        variants["nas-split-bf16"] = lambda m: nas_split_steps(m, x, y, a.steps, a.batch, device,
                                                               precision="bf16-mixed")
        variants["nas-split-compile"] = lambda m: nas_split_steps(m, x, y, a.steps, a.batch, device, compile=True)
    for fn in variants.values():  # warm-up (allocator, cuDNN autotuning, compilation)
        fn(copy.deepcopy(base))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.repeats):
        for k, fn in variants.items():
            times[k].append(fn(copy.deepcopy(base)))
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: a.steps / v for k, v in med.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"mobilenetv1_cifar_025 x0.125, 28 px, batch {a.batch}, {a.steps} steps x {a.repeats} repeats on {name}")
    print(f"{'loop':<20}{'ms/step':>10}{'steps/s':>10}{'vs plain':>10}")
    for k in variants:
        print(f"{k:<20}{1e3 * med[k] / a.steps:>10.2f}{rate[k]:>10.2f}{rate[k] / rate['plain']:>10.2f}")
    an = statistics.median(analysis_seconds(base, x, y, a.batch, device) for _ in range(3))
    epoch = 60000 / a.batch / rate["nas-split"]
    print(f"fast analysis (20 batches x 4 passes): {an:.2f} s = {an / epoch:.3f} of a 60k-sample epoch "
          f"({epoch:.1f} s)")
    print(f"channels_last gain (plain-cl / plain): {rate['plain-cl'] / rate['plain']:.2f}x; "
          f"nas-split / plain-cl: {rate['nas-split'] / rate['plain-cl']:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "steps": a.steps, "repeats": a.repeats, "batch": a.batch,
                       "ms_per_step": {k: 1e3 * v / a.steps for k, v in med.items()},
                       "analysis_s": an, "epoch_s": epoch}, f, indent=2)


if __name__ == "__main__":
    main()
