"""Variance-transfer growth with learning-rate adaptation (Yuan, Savarese & Maire, NeurIPS 2023), as ``vt``.

Growth of layer ℓ adds ``Δ`` pairs of neurons with the same fan-in and opposite fan-out (the paper's variance transfer):

    W_ℓ ← [W_ℓ ; V ; V],      W_{ℓ+1} ← [β W_{ℓ+1}, Z, −Z],

so the new neurons cancel (``Z σ(Vx) − Z σ(Vx) = 0``) and the network function is kept.

**Variance transfer** (§6.3; of the sources' variants nas-split takes the empirical one, gromo's reading of the
paper's App. A, because a trained layer's weights no longer have their initial variance): a consumer whose
fan-in grew from ``F`` to ``F'`` has its old columns (and bias) scaled by ``β = sqrt(F / F')`` and its new
columns drawn with the variance of the rescaled old ones, ``Var Z = β² Var W_old``; so ``fan_in × Var W`` — a
layer's output variance for independent unit-variance inputs — is the same before and after growth once the new
neurons carry their own signal.  The new fan-ins ``V`` have the variance of the layer's old rows.  The
consumer's batch norm absorbs β (:mod:`nas_split.growth.variance`, shared with the splitting methods'
``variance_transfer`` option), so the function is kept exactly, in eval and in train mode.  A consumer without a
norm after it (a classifier) is not rescaled (nothing would absorb the scale); its new columns get its old
columns' variance.

**Learning-rate adaptation** (§6.4): :mod:`nas_split.growth.rates`, shared with the splitting methods' ``lra``
option; μP's per-layer rates for the input and output layers (§6.1) are ``vt``'s ``mup`` option
(:class:`nas_split.growth.rates.LayerRates`).  μP's initial variances are not imposed: the new weights take the
empirical variances above, the rule of §6.3's App. A variant.  Optional batch-size adaptation (§6.5; its rule is
not documented by either source) is not implemented.  The MAC schedule is the engine's, as for every growth
method: each round grows every layer by the same fraction of its width, in pairs, until the round's cap.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from nas_split.growth.channel_cost import prefix_within_macs
from nas_split.growth.neurons import splittable_layers
from nas_split.growth.variance import fan_in_growth, transfer_betas, transfer_variance
from nas_split.surgery import CouplingGraph, NewChannels, add_channels

__all__ = ["VTReport", "vt_counts", "vt_grow"]


@dataclass
class VTReport:
    """Neurons added per layer (pairs × 2) and the variance-transfer factor β applied to each consumer."""

    added: dict[str, int]
    beta: dict[str, float] = field(default_factory=dict)

    @property
    def new_neurons(self) -> int:
        """Neurons added in all layers."""
        return sum(self.added.values())


def vt_counts(model: nn.Module, example_inputs: torch.Tensor, grow_ratio: float,
              max_macs: float | None = None) -> dict[str, int]:
    """Pairs to add per layer: ``⌊grow_ratio × width / 2⌋`` (at least 1), or, with ``max_macs``, every layer grown
    by the same fraction of its width, a pair at a time, until the next pair would pass the budget."""
    modules = dict(model.named_modules())
    widths = {n: modules[n].weight.shape[0] for n in splittable_layers(model, example_inputs)}
    if max_macs is None:
        return {n: max(1, int(grow_ratio * w / 2)) for n, w in widths.items()}
    order = sorted((2 * (j + 1) / w, n) for n, w in widths.items() for j in range(w))
    k = prefix_within_macs(model, example_inputs, [(n, 2) for _, n in order], max_macs)
    return dict(Counter(n for _, n in order[:k]))


def vt_grow(model: nn.Module, example_inputs: torch.Tensor, pairs: Mapping[str, int],
            optimizer: torch.optim.Optimizer | None = None, generator: torch.Generator | None = None,
            variance_transfer: bool = True) -> VTReport:
    """Add ``2 × pairs[layer]`` neurons to each layer in place (see the module docstring); returns what was done."""
    gen = generator or torch.Generator().manual_seed(0)
    graph = CouplingGraph(model, example_inputs)
    modules = dict(model.named_modules())
    grows = fan_in_growth(graph, {layer: 2 * k for layer, k in pairs.items()})  # consumer -> new input channels
    beta, norms = transfer_betas(model, example_inputs, grows, {n: modules[n].weight.shape[1] for n in grows}) \
        if variance_transfer else ({}, {})
    additions = {}
    for layer, k in pairs.items():
        root = graph.modules[layer]
        row = tuple(root.weight.shape[1:])
        v = torch.randn((k, *row), generator=gen) * root.weight.detach().float().std().cpu()
        fan_out = {}
        for s in graph.group(layer).slots:
            if s.role != "consumer" or len(s.positions[0]) != 1:
                continue  # a consumer reading a channel at several positions (after a flatten) gets zero columns
            w = s.module.weight
            std = w.detach().float().flatten(1).std(1).cpu() * beta.get(s.name, 1.0)  # per output row
            z = torch.randn((k, w.shape[0], *w.shape[2:]), generator=gen) * std.view(1, -1, *[1] * (w.dim() - 2))
            fan_out[s.name] = torch.cat([z, -z]).to(w)
        additions[layer] = NewChannels(2 * k, fan_in=torch.cat([v, v]).to(root.weight), fan_out=fan_out)
    old_in = {n: modules[n].weight.shape[1] for n in grows}
    old_out = {n: modules[n].weight.shape[0] for n in pairs}
    add_channels(model, example_inputs, additions, optimizer=optimizer, graph=graph)
    for n in [n for n in pairs if n in old_in]:  # new rows x new columns (zero after surgery): drawn too, per pair
        w, k = modules[n].weight, pairs[n]
        block = torch.randn((k, w.shape[1] - old_in[n], *w.shape[2:]), generator=gen) * additions[n].fan_in.std()
        with torch.no_grad():
            w[old_out[n]:old_out[n] + 2 * k, old_in[n]:] = torch.cat([block, block]).to(w)
    transfer_variance(model, beta, norms, columns=old_in)  # old columns; the new ones were drawn at β² Var W
    return VTReport({n: 2 * k for n, k in pairs.items()}, beta)
