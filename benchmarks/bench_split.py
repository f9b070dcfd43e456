"""Time of one full split of 30 % of all neurons of timm mobilenetv2_100, against one training step.

Run:  python benchmarks/bench_split.py [--repeats 3] [--batch 32] [--size 224]
      python benchmarks/bench_split.py --grower [--rounds 3]

Prints the medians and their ratio, all measured in this run. "One full split" is everything ``nas_split.split``
does for a plan over every coupled channel group: tracing the coupling graph, validating, the surgery and the
optimizer-state carry. A training step is forward + backward + SGD step on one batch.

``--grower`` times whole ``Grower.step`` rounds instead (timm ``mobilenetv2_050`` at 64 px, fast analysis of one
batch of 8, grow ratio 0.1): the first includes verifying every layer by a trial split, later ones reuse it.  The
same command on an older checkout gives the "before" figure.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch

import nas_split as ns
from nas_split.surgery import CouplingGraph


def plan_30_percent(model, x, frac, gen):
    graph = CouplingGraph(model, x)
    owned, plan, total = set(), {}, 0
    for layer in ns.growable_layers(model, x, verify=False, graph=graph):
        group = graph.group(layer)
        if owned & set(group.producers):
            continue
        owned |= set(group.producers)
        total += group.width
        k = int(round(frac * group.width))
        plan[layer] = torch.randperm(group.width, generator=gen)[:k].tolist()
    return plan, total


def grower_rounds(rounds: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_050", num_classes=10)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    t = time.perf_counter()
    grower = ns.Grower(model, x, "fast", grow_ratio=0.1, analysis_batches=1, fast_passes=1)
    times = [time.perf_counter() - t]
    for _ in range(rounds):
        t = time.perf_counter()
        grower.step([(x, y)])
        times.append(time.perf_counter() - t)
    print(f"mobilenetv2_050 @ 64px, {torch.get_num_threads()} threads: Grower() {times[0]:.2f} s, then "
          + ", ".join(f"step {i + 1} {s:.2f} s" for i, s in enumerate(times[1:]))
          + f"; total {sum(times):.2f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--frac", type=float, default=0.3)
    ap.add_argument("--grower", action="store_true", help="time Grower rounds instead")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if a.grower:
        return grower_rounds(a.rounds)
    torch.manual_seed(0)
    base = timm.create_model("mobilenetv2_100", num_classes=1000)
    x1 = torch.randn(1, 3, a.size, a.size)
    plan, total = plan_30_percent(base, x1, a.frac, torch.Generator().manual_seed(0))
    n_split = sum(len(v) for v in plan.values())
    split_t, step_t = [], []
    for _ in range(a.repeats):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        xb, yb = torch.randn(a.batch, 3, a.size, a.size), torch.randint(0, 1000, (a.batch,))
        model.train()
        for timings in (None, step_t):  # first step warms up and fills the momentum buffers
            t = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            if timings is not None:
                timings.append(time.perf_counter() - t)
        t = time.perf_counter()
        ns.split(model, x1, plan, eps=1e-2, optimizer=opt)
        split_t.append(time.perf_counter() - t)
    s, st = statistics.median(split_t), statistics.median(step_t)
    print(f"mobilenetv2_100 @ {a.size}px, {torch.get_num_threads()} threads: split {n_split} of {total} neurons "
          f"({100 * n_split / total:.0f} %) in {len(plan)} groups")
    print(f"split (trace + surgery + optimizer carry): median {s:.2f} s over {a.repeats}")
    print(f"training step (batch {a.batch}, SGD):        median {st:.2f} s over {a.repeats}")
    print(f"ratio split / training step: {s / st:.2f}")


if __name__ == "__main__":
    main()
