"""The cost of one more output channel of a layer, from the model's own cost accounting.

Adding a channel to layer ℓ grows every slot of its coupling group by one position: the producing layers'
rows (MACs and output activations), depthwise filters in between (MACs, input and output activations) and each
consumer's input columns (MACs and input activations, once per position the channel occupies).  MACs and bytes
of a conv/linear layer are linear in each of its channel counts, so the increase is the layer's own figure
(from :func:`nas_split.cost.measure_cost`) divided by its width — exact, not a hand table.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..cost import EnergyModel, measure_cost
from ..surgery import ChannelGroup
from ..surgery.graph import is_depthwise

__all__ = ["ChannelCost", "channel_costs"]

_BYTES = 4


@dataclass(frozen=True)
class ChannelCost:
    """Increase per new output channel: MACs (counted) and energy in pJ (estimated)."""

    macs: float
    energy_pj: float


def channel_costs(model: nn.Module, example_inputs: torch.Tensor, groups: Mapping[str, ChannelGroup],
                  energy_model: EnergyModel | None = None) -> dict[str, ChannelCost]:
    """``{layer: ChannelCost}`` for the root layer of each group."""
    em = energy_model or EnergyModel()
    layers = {lc.name: lc for lc in measure_cost(model, example_inputs, em, latency=False).layers}
    out = {}
    for layer, group in groups.items():
        macs = nbytes = 0.0
        for s in group.slots:
            if s.role == "norm" or s.name not in layers:
                continue
            lc, m = layers[s.name], s.module
            w_bytes = m.weight.numel() * _BYTES
            b_bytes = m.bias.numel() * _BYTES if getattr(m, "bias", None) is not None else 0
            if s.dim == "out":
                n = m.weight.shape[0]
                extra = lc.input_bytes if is_depthwise(m) else 0
                macs += lc.macs / n
                nbytes += (w_bytes + b_bytes + lc.output_bytes + extra) / n
            else:
                n = m.weight.shape[1]
                r = len(s.positions[0])
                macs += lc.macs / n * r
                nbytes += (w_bytes + lc.input_bytes) / n * r
        out[layer] = ChannelCost(macs, em.layer_energy_pj(macs, nbytes))
    return out
