"""Neurons of a layer: the conv/linear output channel, its batch norm (folded, eval mode) and its activation.

For neuron ``o`` of layer ℓ with input patch ``p``:  ``z = w_o·p (+ bias)``, ``u = a_o z + b_o`` with
``a_o = γ_o / sqrt(σ²_o + ε)``, ``b_o = β_o − a_o μ_o`` (identity without a norm), and ``σ = act(u)``.

The norm and the activation are found by tracing one forward pass with hooks: the module that consumes the
layer's output (a batch norm, possibly timm's ``BatchNormAct2d`` with its own ``act``), then the activation
module that consumes the norm's output.  An activation applied functionally (``F.relu`` inside a ``forward``)
cannot be hooked; such layers are reported as not analyzable.

When the activation's only consumer is a depthwise conv (MobileNet blocks: pointwise -> depthwise, MobileNetV2's
expansion inside an inverted residual) the copies of a split neuron pass through another per-channel
nonlinearity before the linear consumer: ``e_q = s Σ_k K_k σ(u_{q+k}) + t``, ``y_q = τ(e_q)``.  That depthwise
conv, its norm and its activation are the neuron's :class:`Tail`; the analysis adds the tail's curvature term.
A depthwise conv with a channel multiplier (``out_channels != groups``) is not followed: its term is left out.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import NasSplitError
from ..numerics import evaluating, like_model
from ..surgery import CouplingGraph, growable_layers
from ..surgery.handlers import is_depthwise

__all__ = ["LINEAR", "activation_kind", "Neuron", "Tail", "find_neurons", "splittable_layers", "NotAnalyzableError"]

#: the kind of a neuron without a nonlinearity
LINEAR = "identity"

_KINDS: tuple[tuple[type, str], ...] = ((nn.ReLU6, "relu6"), (nn.ReLU, "relu"), (nn.SiLU, "silu"),
                                        (nn.Hardswish, "hardswish"), (nn.Tanh, "tanh"), (nn.Sigmoid, "sigmoid"),
                                        (nn.Identity, LINEAR))


def activation_kind(module: nn.Module | None) -> str | None:
    """The kind of an activation module (``"relu"``, ``"silu"``, ...), ``"identity"`` for none, ``None`` if unknown."""
    if module is None:
        return LINEAR
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else None
    if isinstance(module, nn.Hardtanh) and not isinstance(module, nn.ReLU6):
        return None
    for cls, kind in _KINDS:
        if isinstance(module, cls):
            return kind
    return None


class NotAnalyzableError(NasSplitError, ValueError):
    """A layer whose neurons have no splitting matrix nas-split can compute; the message says why."""


def _fold(layer: nn.Module, norm: nn.modules.batchnorm._BatchNorm | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(a, b)`` with ``u = a * (w·p) + b``: ``layer``'s bias and ``norm`` in eval mode."""
    w = layer.weight
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
    if norm is None:
        return torch.ones_like(bias), bias
    gamma = norm.weight.detach() if norm.weight is not None else torch.ones_like(norm.running_var)
    beta = norm.bias.detach() if norm.bias is not None else torch.zeros_like(norm.running_var)
    a = gamma / torch.sqrt(norm.running_var + norm.eps)
    return a, beta + a * (bias - norm.running_mean)


@dataclass
class Tail:
    """A depthwise conv (one kernel per channel), its norm and its nonlinear activation after a neuron."""

    conv: nn.Module
    norm: nn.modules.batchnorm._BatchNorm | None
    act: nn.Module
    kind: str

    def fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(s, t)`` with ``e = s * (K ⋆ σ) + t``, the norm taken in eval mode."""
        return _fold(self.conv, self.norm)


@dataclass
class Neuron:
    """The neurons of one layer."""

    name: str
    layer: nn.Module
    norm: nn.modules.batchnorm._BatchNorm | None
    act: nn.Module | None
    kind: str
    tail: Tail | None = None

    @property
    def is_linear(self) -> bool:
        """No nonlinearity follows: the splitting matrix is zero (see :mod:`nas_split.splitting`)."""
        return self.kind == LINEAR

    def fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(a, b)`` with ``u = a * (w·p) + b``, the norm taken in eval mode."""
        return _fold(self.layer, self.norm)


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
    try:
        with evaluating(model), torch.no_grad():
            model(like_model(model, example_inputs))
    finally:
        for h in handles:
            h.remove()

    def consumers(tid: int, after: int) -> list[tuple[int, str, int]]:
        return [(k, n, out) for k, (n, ins, out) in enumerate(events) if k > after and tid in ins]

    def norm_and_act(name: str, k0: int, tid: int) -> tuple[nn.Module | None, nn.Module | None, int, int]:
        """The norm and activation consuming the output ``tid`` of event ``k0``, and the activation's event and
        output (``k0``, ``tid`` of the last module found when there is no activation)."""
        norm, act = None, None
        nxt = consumers(tid, k0)
        if len(nxt) == 1 and isinstance(modules[nxt[0][1]], nn.modules.batchnorm._BatchNorm):
            k0, nname, tid = nxt[0]
            norm = modules[nname]
            if _is_norm_act(norm):
                return norm, norm.act, k0, tid
            nxt = consumers(tid, k0)
        if nxt:
            first = modules[nxt[0][1]]
            sole_or_inplace = len(nxt) == 1 or nxt[0][2] == tid  # an in-place activation returns its input
            kind = activation_kind(first)
            if sole_or_inplace and kind not in (None, LINEAR):
                return norm, first, nxt[0][0], nxt[0][2]
            if sole_or_inplace and kind is None and not list(first.children()) \
                    and not isinstance(first, nn.modules.conv._ConvNd | nn.Linear | nn.Dropout):
                raise NotAnalyzableError(f"layer {name!r}: activation {type(first).__name__} has no σ'' in "
                                         "nas_split.splitting.activations")
        return norm, act, k0, tid

    out = {}
    for name in layers:
        pos = [k for k, e in enumerate(events) if e[0] == name]
        if not pos:
            raise NotAnalyzableError(f"layer {name!r} is not used in the forward pass")
        norm, act, k_act, t_act = norm_and_act(name, pos[0], events[pos[0]][2])
        nr = _neuron(name, modules[name], norm, act)
        nxt = consumers(t_act, k_act) if act is not None else []
        if len(nxt) == 1 and _follows(modules[nxt[0][1]]) and isinstance(nr.layer, nn.modules.conv._ConvNd):
            k_dw, dw_name, t_dw = nxt[0]
            norm2, act2, _, _ = norm_and_act(dw_name, k_dw, t_dw)
            kind2 = _kind(dw_name, act2)
            if kind2 != LINEAR:
                nr.tail = Tail(modules[dw_name], norm2, act2, kind2)
        out[name] = nr
    return out


def _follows(m: nn.Module) -> bool:
    """A depthwise conv the analysis follows: Conv1d / Conv2d with numeric zero padding, channel multiplier 1."""
    return is_depthwise(m) and isinstance(m, nn.Conv1d | nn.Conv2d) and m.padding_mode == "zeros" \
        and not isinstance(m.padding, str)


def _kind(name: str, act: nn.Module | None) -> str:
    """The activation kind of ``act`` after layer ``name``; refuses an activation without a known σ''."""
    kind = activation_kind(act)
    if kind is None:
        raise NotAnalyzableError(f"layer {name!r}: activation {type(act).__name__} has no σ'' in "
                                 "nas_split.splitting.activations")
    return kind


def _neuron(name: str, layer: nn.Module, norm, act) -> Neuron:
    return Neuron(name, layer, norm, act, _kind(name, act))


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
