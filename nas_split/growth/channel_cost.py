"""The cost of one more output channel of a layer, from the model's own cost accounting.

Adding a channel to layer ℓ grows every slot of its coupling group by one position: the producing layers'
rows, depthwise filters in between and each consumer's input columns (once per position the channel occupies).
Each affected conv/linear layer's :class:`~nas_split.cost.LayerShape` (from
:func:`nas_split.cost.measure_cost`) is grown by those positions and priced by the cost model
(:meth:`~nas_split.cost.CostModel.channel_cost`): the increase in MACs is exact (MACs scale with
``out x in``), and so is an analytic energy model's; a measured table gives its measured slope.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..cost import CostModel, count_macs, measure_cost
from ..cost import cost_model as build_cost_model
from ..numerics import full_precision
from ..surgery import ChannelGroup, CouplingGraph
from ..surgery.handlers import is_depthwise

__all__ = ["ChannelCost", "channel_costs", "macs_after_growth", "prefix_within_macs", "longest_prefix"]


@dataclass(frozen=True)
class ChannelCost:
    """Increase per new output channel: MACs (counted) and the cost model's price (in its unit)."""

    macs: float
    priced: float


@full_precision()
def channel_costs(model: nn.Module, example_inputs: torch.Tensor, groups: Mapping[str, ChannelGroup],
                  cost_model: CostModel | str | None = None) -> dict[str, ChannelCost]:
    """``{layer: ChannelCost}`` for the root layer of each group, priced by ``cost_model`` (default: the analytic
    energy model).

    A dense layer's MACs and weights scale with ``out x in``; one that both reads and writes the channels (a
    residual stream it belongs to) grows in both factors, so the increase is computed per layer, exactly.
    """
    priced_by = build_cost_model(cost_model)
    report = measure_cost(model, example_inputs, latency=False, cost_model=priced_by)
    layers = {lc.name: lc for lc in report.layers}
    out = {}
    for layer, group in groups.items():
        grow: dict[str, dict[str, int]] = {}
        for s in group.slots:
            if s.role != "norm" and s.name in layers:
                grow.setdefault(s.name, {})[s.dim] = 1 if s.dim == "out" else len(s.positions[0])
        macs = priced = 0.0
        for name, dims in grow.items():
            shape = layers[name].shape
            d_out, d_in = dims.get("out", 0), dims.get("in", 0)
            macs += shape.grown(d_out, d_in).macs - shape.macs
            priced += priced_by.channel_cost(shape, d_out, d_in)
        out[layer] = ChannelCost(macs, priced)
    return out


def macs_after_growth(model: nn.Module, example_inputs: torch.Tensor, groups: Mapping[str, ChannelGroup],
                      added: Mapping[str, int], counted: tuple[int, dict[str, int]] | None = None) -> float:
    """MACs per sample once ``added[layer]`` output channels are added to each group's root — exact, cross terms
    included (a consumer fed by two grown groups, a layer that reads and writes its own stream).

    Each conv/linear layer's MACs scale with ``(out + Δout)/out x (in + Δin)/in`` (depthwise: ``(C + ΔC)/C``),
    where ``Δin`` counts every position a new channel occupies (flatten).  ``counted`` is a cached
    :func:`nas_split.cost.count_macs` result.
    """
    total, per = counted or count_macs(model, example_inputs)
    d_out: dict[str, int] = defaultdict(int)
    d_in: dict[str, int] = defaultdict(int)
    modules = {}
    for layer, n in added.items():
        for s in groups[layer].slots:
            if s.role == "norm" or s.name not in per or not n:
                continue
            modules[s.name] = s.module
            if s.dim == "out":
                d_out[s.name] += n
            else:
                d_in[s.name] += n * len(s.positions[0])
    out = float(total)
    for name, m in modules.items():
        if is_depthwise(m):
            c = m.weight.shape[0]
            f = (c + max(d_out[name], d_in[name])) / c
        else:
            f = (m.weight.shape[0] + d_out[name]) / m.weight.shape[0] * \
                (m.weight.shape[1] + d_in[name]) / m.weight.shape[1]
        out += per[name] * (f - 1)
    return out


def prefix_within_macs(model: nn.Module, example_inputs: torch.Tensor, items: Sequence[tuple[str, int]],
                       max_macs: float, graph: CouplingGraph | None = None) -> int:
    """The longest prefix of ``items`` (``(layer, new neurons)``, best first) whose growth keeps the model's MACs
    at or under ``max_macs``; found by bisection, since MACs only increase with every added neuron.
    """
    if not items:
        return 0
    graph = graph or CouplingGraph(model, example_inputs)
    groups = {layer: graph.group(layer) for layer in {layer for layer, _ in items}}
    counted = count_macs(model, example_inputs)

    def fits(k: int) -> bool:
        added: dict[str, int] = defaultdict(int)
        for layer, n in items[:k]:
            added[layer] += n
        return macs_after_growth(model, example_inputs, groups, added, counted) <= max_macs

    return longest_prefix(len(items), fits)


def longest_prefix(n: int, fits: Callable[[int], bool]) -> int:
    """The largest ``k <= n`` with ``fits(k)``, by bisection: ``fits`` must hold at 0 and, once false, stay false
    (MACs only increase with every item added)."""
    lo, hi = 0, n  # invariant: fits(lo); the answer is in [lo, hi]
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
