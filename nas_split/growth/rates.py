"""Learning-rate adaptation per growth stage (Yuan, Savarese & Maire, NeurIPS 2023; the growing_wiki statement,
not checked against the paper), and μP's per-layer learning-rate factors (Yang et al., "Tensor Programs V", 2022).

The weights of a layer are partitioned by the growth stage that added them, ``W = {W_0, W_Δ1, ...}``, and stage
``t``'s slice learns at ``η_t = η_0 ‖W_Δt‖_F / ‖W_0‖_F`` (the norms when the rates are set, after each growth).
nas-split applies it as a gradient scale on the slice's rows of the layer, its norm and depthwise filters, and on
its columns in the consumers (with SGD the same as a learning-rate factor, except on weight decay).  ``vt``
growth uses it, and the splitting methods with ``lra: true`` (their copies are the stage's new channels).
Surgery appends new channels at the end of a layer, so a layer's stage labels grow by appending.

**μP factors** (:class:`LayerRates`, ``vt``'s ``mup`` option): under the maximal-update parameterisation an input
layer's SGD rate scales with its fan-out, the output layer's with 1/fan-in, hidden layers' not at all; relative to
the seed's widths, a grown model's input layers learn at ``fan_out / fan_out_0`` and its output layer at
``fan_in_0 / fan_in`` times the recipe's rate (gradient scales on their own weights and biases).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..numerics import evaluating, like_model, model_device
from ..surgery.graph import CouplingGraph
from ..surgery.handlers import handler_for

__all__ = ["lra_factors", "SliceRates", "io_layers", "LayerRates"]


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


def io_layers(model: nn.Module, example_inputs: torch.Tensor) -> tuple[list[str], list[str]]:
    """The conv/linear layers that read the model's input, and those whose output is the model's output."""
    x = like_model(model, example_inputs)
    seen: list[tuple[str, bool, torch.Tensor]] = []  # outputs kept alive: no id is reused
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.append((n, inp[0] is x, out)))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    try:
        with evaluating(model), torch.no_grad():
            y = model(x)
    finally:
        for h in hooks:
            h.remove()
    return [n for n, reads, _ in seen if reads], [n for n, _, out in seen if out is y]


class LayerRates:
    """μP's per-layer learning-rate factors as gradient scales (see the module docstring); ``base`` holds the
    seed's ``[fan_out, fan_in]`` of the input and output layers (:meth:`remember` before the first growth)."""

    def __init__(self):
        self.handles: list = []
        self.base: dict[str, list[int]] = {}

    def remember(self, model: nn.Module, example_inputs: torch.Tensor) -> None:
        """Record the widths the factors are relative to (once: the seed's)."""
        if not self.base:
            inputs, outputs = io_layers(model, example_inputs)
            modules = dict(model.named_modules())
            self.base = {n: list(modules[n].weight.shape[:2]) for n in (*inputs, *outputs)}

    def set(self, model: nn.Module, example_inputs: torch.Tensor) -> dict[str, float]:
        """Scale the gradients of the input and output layers' parameters by their factors; returns them."""
        self.remove()
        inputs, outputs = io_layers(model, example_inputs)
        modules = dict(model.named_modules())
        factors: dict[str, float] = {}
        for n in inputs:
            factors[n] = modules[n].weight.shape[0] / self.base[n][0]
        for n in outputs:
            factors[n] = factors.get(n, 1.0) * self.base[n][1] / modules[n].weight.shape[1]
        for n, f in factors.items():
            for p in (modules[n].weight, getattr(modules[n], "bias", None)):
                if isinstance(p, nn.Parameter) and f != 1.0:
                    self.handles.append(p.register_hook(lambda g, f=f: g * f))
        return factors

    def remove(self) -> None:
        """Drop every hook."""
        for h in self.handles:
            h.remove()
        self.handles = []
