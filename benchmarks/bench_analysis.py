"""Fast (Rayleigh-quotient) vs exact splitting analysis, each divided by one training epoch, CIFAR-style MobileNetV1.

Run:  python benchmarks/bench_analysis.py [--widths 32 128] [--batches 20] [--exact-batches 2]

Data: synthetic 32x32x3 batches of 64 (CIFAR-10's shape; no download). "One epoch" is 782 training steps
(50k images / 64) at the median step time measured here.

* fast: nas-split's defaults, 3 passes over ``--batches`` batches plus one pass to average λ, for both ends
  of the spectrum (S3D) and for ``v_min`` only (S2D);
* exact: every splitting matrix and ``eigh``, timed on ``--exact-batches`` batches; its cost is linear in the
  batches, so it is reported per batch and for its default budget, one pass over the training set (782 batches,
  as the published S2D code does).

Ratios: per batch (exact per batch / fast per batch and pass, both ends) and at the defaults (exact one epoch
of data / fast with its defaults, S2D). Medians of ``--repeats``; everything measured in this run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import nas_split as ns
import search_spaces
from nas_split.growth.neurons import find_neurons
from nas_split.splitting.analysis import exact_spectrum, fast_spectrum

STEPS_PER_EPOCH = 782


def _median_time(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128], help="uniform widths to test")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--exact-batches", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g))
            for _ in range(a.batches)]
    print(f"{torch.get_num_threads()} threads, batch 64, 32x32; epoch = {STEPS_PER_EPOCH} steps")
    print(f"{'width':>5} {'epoch s':>8} {'fast s2d':>8} {'fast s3d':>8} {'exact/batch':>11} "
          f"{'fast s2d/epoch':>14} {'fast s3d/epoch':>14} {'exact/epoch':>11} {'exact/fast per batch':>20} "
          f"{'exact/fast default':>18}")
    for w in a.widths:
        _bench_width(w, data, a)


def _bench_width(w: int, data: list, a: argparse.Namespace) -> None:
    model = search_spaces.create("mobilenetv1_cifar_100", num_classes=10, in_chans=3, input_size=32,
                                 widths=[w] * 14)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = data[0]

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    model.train()
    step()
    t_step = _median_time(step, max(a.repeats, 5))
    neurons = find_neurons(model, x[:2], ns.growable_layers(model, x[:2]))
    passes = 4  # 3 update passes + 1 averaging pass

    def fast(ends):
        return _median_time(lambda: fast_spectrum(model, data, neurons, F.cross_entropy, max_batches=a.batches,
                                                  ends=ends), a.repeats)

    t_s2d, t_s3d = fast(("min",)), fast(("min", "max"))
    t_exact_batch = _median_time(lambda: exact_spectrum(model, data, neurons, F.cross_entropy,
                                                        max_batches=a.exact_batches), 1) / a.exact_batches
    epoch = t_step * STEPS_PER_EPOCH
    exact_default = t_exact_batch * STEPS_PER_EPOCH
    per_batch = t_exact_batch / (t_s3d / (passes * a.batches))
    print(f"{w:>5} {epoch:>8.1f} {t_s2d:>8.1f} {t_s3d:>8.1f} {t_exact_batch:>11.2f} {t_s2d / epoch:>14.3f} "
          f"{t_s3d / epoch:>14.3f} {exact_default / epoch:>11.2f} {per_batch:>20.1f} "
          f"{exact_default / t_s2d:>18.1f}", flush=True)


if __name__ == "__main__":
    main()
