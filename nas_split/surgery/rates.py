"""Learning-rate adaptation per growth stage (Yuan, Savarese & Maire 2023, algorithms.md §6.4, the growing_wiki
statement, not checked against the paper).

The weights of a layer are partitioned by the growth stage that added them, ``W = {W_0, W_Δ1, ...}``, and stage
``t``'s slice learns at ``η_t = η_0 ‖W_Δt‖_F / ‖W_0‖_F`` (the norms when the rates are set, after each growth).
nas-split applies it as a gradient scale on the slice's rows of the layer, its norm and depthwise filters, and on
its columns in the consumers (with SGD the same as a learning-rate factor, except on weight decay).  ``vt``
growth uses it, and the splitting methods with ``lra: true`` (their copies are the stage's new channels).
Surgery appends new channels at the end of a layer, so a layer's stage labels grow by appending.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..numerics import model_device
from .graph import CouplingGraph
from .handlers import handler_for

__all__ = ["lra_factors", "SliceRates"]


def lra_factors(model: nn.Module, stages: Mapping[str, list[int]]) -> dict[str, dict[int, float]]:
    """``{layer: {stage: ‖W_Δt‖_F / ‖W_0‖_F}}`` from the rows each stage added (``stages[layer][c]``: the stage
    that added output channel ``c``); stage 0 is 1."""
    modules = dict(model.named_modules())
    out = {}
    for layer, labels in stages.items():
        w = modules[layer].weight.detach()
        lab = torch.as_tensor(labels, device=w.device)
        base = w[lab == 0].norm().clamp_min(1e-12)
        out[layer] = {int(t): float(w[lab == t].norm() / base) for t in sorted(set(labels))}
    return out


class SliceRates:
    """Gradient scales per (layer, growth stage) slice: rows of the layer and its norm, columns in its
    consumers.  ``stages[layer][c]`` is the growth stage that added output channel ``c``; :meth:`record` labels a
    growth's appended channels and sets the rates, :meth:`set` replaces the hooks (surgery replaces the
    parameters anyway)."""

    def __init__(self):
        self.handles: list = []
        self.stages: dict[str, list[int]] = {}

    def record(self, model: nn.Module, example_inputs: torch.Tensor, widths: Mapping[str, tuple[int, int]],
               stage: int) -> dict[str, dict[str, float]]:
        """Label the channels a growth appended (``{layer: (old width, new width)}``) with ``stage`` and set the
        rates of every slice; returns the factors, JSON-ready."""
        for layer, (old, new) in widths.items():
            self.stages[layer] = self.stages.get(layer, [0] * old) + [stage] * (new - old)
        return {n: {str(t): f for t, f in fs.items()} for n, fs in self.restore(model, example_inputs).items()}

    def restore(self, model: nn.Module, example_inputs: torch.Tensor,
                stages: Mapping[str, list[int]] | None = None) -> dict[str, dict[int, float]]:
        """Set the rates from ``stages`` (default: the ones recorded), e.g. those a checkpoint kept."""
        if stages is not None:
            self.stages = {k: list(v) for k, v in stages.items()}
        factors = lra_factors(model, self.stages)
        self.set(model, example_inputs, self.stages, factors)
        return factors

    def set(self, model: nn.Module, example_inputs: torch.Tensor, stages: Mapping[str, list[int]],
            factors: Mapping[str, Mapping[int, float]]) -> None:
        self.remove()
        graph = CouplingGraph(model, example_inputs)
        scales: dict[tuple[int, int], tuple[torch.nn.Parameter, int, torch.Tensor]] = {}
        for layer, labels in stages.items():
            per_channel = torch.tensor([factors[layer][t] for t in labels])
            for s in graph.group(layer).slots:
                for attr, axis in handler_for(s.module).tensors(s.module, s.dim):
                    p = getattr(s.module, attr)
                    if not isinstance(p, nn.Parameter):
                        continue
                    key = (id(p), axis)
                    if key not in scales:
                        scales[key] = (p, axis, torch.ones(p.shape[axis]))
                    t = scales[key][2]
                    for c, pos in enumerate(s.positions):
                        for i in pos:
                            t[i] = per_channel[c]
        for p, axis, t in scales.values():
            if torch.all(t == 1):
                continue
            shape = [1] * p.dim()
            shape[axis] = -1
            t = t.view(shape).to(model_device(model), p.dtype)
            self.handles.append(p.register_hook(lambda g, t=t: g * t))

    def remove(self) -> None:
        """Drop every hook."""
        for h in self.handles:
            h.remove()
        self.handles = []
