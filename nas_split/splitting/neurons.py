"""Neurons of a layer: the conv/linear output channel, its batch norm (folded, eval mode) and its activation.

For neuron ``o`` of layer ℓ with input patch ``p``:  ``z = w_o·p (+ bias)``, ``u = a_o z + b_o`` with
``a_o = γ_o / sqrt(σ²_o + ε)``, ``b_o = β_o − a_o μ_o`` (identity without a norm), and ``σ = act(u)``.

The norm and the activation are found by tracing one forward pass with hooks: the module that consumes the
layer's output (a batch norm, possibly timm's ``BatchNormAct2d`` with its own ``act``), then the activation
module that consumes the norm's output.  An activation applied functionally (``F.relu`` inside a ``forward``)
cannot be hooked; such layers are reported as not analyzable.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import NasSplitError
from ..numerics import like_model
from ..surgery import CouplingGraph, growable_layers
from .activations import LINEAR, activation_kind

__all__ = ["Neuron", "find_neurons", "splittable_layers", "NotAnalyzableError"]


class NotAnalyzableError(NasSplitError, ValueError):
    """A layer whose neurons have no splitting matrix nas-split can compute; the message says why."""


@dataclass
class Neuron:
    """The neurons of one layer."""

    name: str
    layer: nn.Module
    norm: nn.modules.batchnorm._BatchNorm | None
    act: nn.Module | None
    kind: str

    @property
    def is_linear(self) -> bool:
        """No nonlinearity follows: the splitting matrix is zero (see :mod:`nas_split.splitting`)."""
        return self.kind == LINEAR

    def fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(a, b)`` with ``u = a * (w·p) + b``, the norm taken in eval mode."""
        w = self.layer.weight
        bias = self.layer.bias.detach() if self.layer.bias is not None else torch.zeros(w.shape[0], device=w.device,
                                                                                          dtype=w.dtype)
        if self.norm is None:
            return torch.ones_like(bias), bias
        n = self.norm
        gamma = n.weight.detach() if n.weight is not None else torch.ones_like(n.running_var)
        beta = n.bias.detach() if n.bias is not None else torch.zeros_like(n.running_var)
        a = gamma / torch.sqrt(n.running_var + n.eps)
        return a, beta + a * (bias - n.running_mean)


def _is_norm_act(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and isinstance(getattr(m, "act", None), nn.Module)


def find_neurons(model: nn.Module, example_inputs: torch.Tensor, layers: list[str]) -> dict[str, Neuron]:
    """Trace ``model`` once and return the :class:`Neuron` of each of ``layers`` (conv / linear names)."""
    modules = dict(model.named_modules())
    units = {}
    for n, m in modules.items():  # leaves, and timm BatchNormAct2d as one unit (its act is read from it)
        if any(n.startswith(u + ".") for u in units):
            continue
        if _is_norm_act(m) or not list(m.children()):
            units[n] = m
    events: list[tuple[str, list[int], int]] = []
    keep: list[torch.Tensor] = []

    def hook(name):
        def fn(_m, inputs, output):
            if torch.is_tensor(output):
                keep.extend([*[t for t in inputs if torch.is_tensor(t)], output])
                events.append((name, [id(t) for t in inputs if torch.is_tensor(t)], id(output)))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in units.items()]
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(like_model(model, example_inputs))
    finally:
        model.train(was)
        for h in handles:
            h.remove()

    def consumers(tid: int, after: int) -> list[tuple[int, str, int]]:
        return [(k, n, out) for k, (n, ins, out) in enumerate(events) if k > after and tid in ins]

    out = {}
    for name in layers:
        pos = [k for k, e in enumerate(events) if e[0] == name]
        if not pos:
            raise NotAnalyzableError(f"layer {name!r} is not used in the forward pass")
        k0, (_, _, tid) = pos[0], events[pos[0]]
        norm, act = None, None
        nxt = consumers(tid, k0)
        if len(nxt) == 1 and isinstance(modules[nxt[0][1]], nn.modules.batchnorm._BatchNorm):
            k0, nname, tid = nxt[0]
            norm = modules[nname]
            if _is_norm_act(norm):
                act = norm.act
                out[name] = _neuron(name, modules[name], norm, act)
                continue
            nxt = consumers(tid, k0)
        if nxt:
            first = modules[nxt[0][1]]
            sole_or_inplace = len(nxt) == 1 or nxt[0][2] == tid  # an in-place activation returns its input
            kind = activation_kind(first)
            if sole_or_inplace and kind not in (None, LINEAR):
                act = first
            elif sole_or_inplace and kind is None and not list(first.children()) \
                    and not isinstance(first, nn.modules.conv._ConvNd | nn.Linear | nn.Dropout):
                raise NotAnalyzableError(f"layer {name!r}: activation {type(first).__name__} has no σ'' in "
                                         "nas_split.splitting.activations")
        out[name] = _neuron(name, modules[name], norm, act)
    return out


def _neuron(name: str, layer: nn.Module, norm, act) -> Neuron:
    kind = activation_kind(act)
    if kind is None:
        raise NotAnalyzableError(f"layer {name!r}: activation {type(act).__name__} has no σ'' in "
                                 "nas_split.splitting.activations")
    return Neuron(name, layer, norm, act, kind)


def splittable_layers(model: nn.Module, example_inputs: torch.Tensor, layers: list[str] | None = None,
                      graph: CouplingGraph | None = None, trusted: Collection[str] = ()) -> dict[str, Neuron]:
    """Growable layers whose neurons have a nonlinearity, one per coupled group, with their :class:`Neuron`.

    ``graph``: the model's coupling graph if already traced; ``trusted``: layers already verified growable (see
    :func:`~nas_split.surgery.growable_layers`)."""
    graph = graph or CouplingGraph(model, example_inputs)
    names = layers or growable_layers(model, example_inputs, graph=graph, trusted=trusted)
    owned, out = set(), {}
    for n, nr in find_neurons(model, example_inputs, names).items():
        if nr.is_linear:
            continue
        producers = set(graph.group(n).producers)
        if owned & producers:
            continue
        owned |= producers
        out[n] = nr
    return out
