"""Per-layer-type channel edits, as gathers along one dimension.

An edit of a (module, dimension) is :class:`DimEdit`: new position ``k`` takes old position ``index[k]``,
multiplied by ``factor[k]`` (consumer columns of split copies: the copy weights ``w_i``), plus ``delta[k]``
(displaced rows of the split neuron), or replaced by ``fresh[k]`` (new neurons).  One handler per layer type
(:class:`LayerHandler`, in a registry: :func:`register_handler`, :func:`handler_for`) knows what the layer is to
surgery, which tensors carry each dimension, its size attributes and what a new channel is initialised to
(identity for norms and depthwise filters, zero elsewhere unless given).  This is the one place that knows layer
types: the coupling graph, the sizes and the export ask it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

__all__ = ["DimEdit", "ParamChange", "LayerHandler", "register_handler", "handler_for", "is_depthwise", "apply_edit",
           "resize", "WeightHandler", "ConvHandler", "LinearHandler", "BatchNormHandler"]


@dataclass
class DimEdit:
    """A gather along one dimension; see the module docstring."""

    index: list[int]
    factor: list[float]
    state_factor: list[float]
    delta: dict[int, torch.Tensor] = field(default_factory=dict)
    fresh: dict[int, torch.Tensor | None] = field(default_factory=dict)


@dataclass
class ParamChange:
    """A parameter replaced by a gathered one; the optimizer state follows the same gather along ``axis``."""

    old: nn.Parameter
    new: nn.Parameter
    axis: int
    index: torch.Tensor
    state_factor: torch.Tensor


Kind = Literal["dense", "depthwise", "grouped", "norm"]


class LayerHandler:
    """How channel surgery treats one layer type; one handler per type, registered with :func:`register_handler`.

    ``kind``: ``"dense"`` (a conv / linear layer whose output rows are neurons: a growth root, a producer or a
    consumer), ``"depthwise"`` (one filter per channel: ``in = out``, follows its input), ``"grouped"`` (refused),
    ``"norm"`` (per-channel entries, ``in = out``).  To teach nas-split a new layer type, subclass this, fill in the
    methods, and register it for the type; the coupling graph, the edits, the sizes and the export all ask the
    handler (:func:`handler_for`), so nothing else changes.
    """

    def kind(self, m: nn.Module) -> Kind:
        """What the layer is to channel surgery."""
        raise NotImplementedError

    def sizes(self, m: nn.Module) -> list[int]:
        """``[out, in]`` channel counts."""
        raise NotImplementedError

    def tensors(self, m: nn.Module, dim: str) -> list[tuple[str, int]]:
        """``(attribute, axis)`` of every tensor indexed by channel along ``dim`` (``"out"`` / ``"in"``)."""
        raise NotImplementedError

    def fresh(self, m: nn.Module, attr: str, like: torch.Tensor) -> torch.Tensor:
        """The value of a new channel's slice ``like`` of ``attr`` (identity for norms, else zero)."""
        return torch.zeros_like(like)

    def set_size(self, m: nn.Module, dim: str, n: int) -> None:
        """Record ``n`` channels along ``dim`` in the module's size attributes."""
        raise NotImplementedError


_HANDLERS: dict[type[nn.Module], LayerHandler] = {}


def register_handler(*types: type[nn.Module]):
    """Class decorator: register an instance of a :class:`LayerHandler` subclass for ``types`` (and their
    subclasses, unless a more specific type has its own)."""
    def deco(cls: type[LayerHandler]) -> type[LayerHandler]:
        for t in types:
            _HANDLERS[t] = cls()
        return cls
    return deco


def handler_for(m: nn.Module) -> LayerHandler | None:
    """The handler of the most specific registered type in ``type(m)``'s MRO, or ``None``."""
    for t in type(m).__mro__:
        if t in _HANDLERS:
            return _HANDLERS[t]
    return None


def is_depthwise(m: nn.Module) -> bool:
    """A convolution with one filter per input channel (``groups == in_channels == out_channels``)."""
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


class WeightHandler(LayerHandler):
    """Layers with a ``weight`` of shape ``(out, in, ...)`` and an optional ``bias``: rows are output channels,
    columns input channels."""

    def tensors(self, m, dim):
        if dim == "in":
            return [("weight", 1)]
        return [(n, 0) for n in ("weight", "bias") if getattr(m, n) is not None]


@register_handler(nn.modules.conv._ConvNd)
class ConvHandler(WeightHandler):
    """Convolutions of any dimension: dense, depthwise (centre-tap identity for new channels) or grouped."""

    def kind(self, m):
        return "depthwise" if is_depthwise(m) else ("grouped" if m.groups != 1 else "dense")

    def sizes(self, m):
        return [m.out_channels, m.in_channels]

    def fresh(self, m, attr, like):
        out = torch.zeros_like(like)
        if attr == "weight" and is_depthwise(m):
            centre = tuple(k // 2 for k in like.shape[1:])  # like: (1, *kernel)
            out[(0, *centre)] = 1.0
        return out

    def set_size(self, m, dim, n):
        if is_depthwise(m):
            m.in_channels = m.out_channels = m.groups = n
        elif dim == "in":
            m.in_channels = n
        else:
            m.out_channels = n


@register_handler(nn.Linear)
class LinearHandler(WeightHandler):
    """Fully connected layers."""

    def kind(self, m):
        return "dense"

    def sizes(self, m):
        return [m.out_features, m.in_features]

    def set_size(self, m, dim, n):
        if dim == "in":
            m.in_features = n
        else:
            m.out_features = n


@register_handler(nn.modules.batchnorm._BatchNorm)
class BatchNormHandler(LayerHandler):
    """Batch norm of any dimension (timm's ``BatchNormAct2d`` too): per-channel affine and running statistics."""

    def kind(self, m):
        return "norm"

    def sizes(self, m):
        return [m.num_features, m.num_features]

    def tensors(self, m, dim):
        return [(n, 0) for n in ("weight", "bias", "running_mean", "running_var") if getattr(m, n) is not None]

    def fresh(self, m, attr, like):  # identity: γ = 1, β = 0, μ = 0, σ² = 1
        return torch.ones_like(like) if attr in ("weight", "running_var") else torch.zeros_like(like)

    def set_size(self, m, dim, n):
        m.num_features = n


def _handler(m: nn.Module) -> LayerHandler:
    h = handler_for(m)
    if h is None:
        raise TypeError(f"no channel handler for {type(m).__name__} (see nas_split.surgery.handlers.register_handler)")
    return h


def apply_edit(module: nn.Module, dim: str, edit: DimEdit) -> list[ParamChange]:
    """Apply ``edit`` to every tensor of ``module`` along ``dim`` and update its size attributes."""
    changes = []
    h = _handler(module)
    for attr, axis in h.tensors(module, dim):
        old = getattr(module, attr)
        idx = torch.as_tensor(edit.index, dtype=torch.long, device=old.device)
        with torch.no_grad():
            new = old.detach().index_select(axis, idx).clone()
            if attr == "weight" and dim == "in" and any(f != 1.0 for f in edit.factor):
                shape = [1] * new.dim()
                shape[axis] = -1
                new *= torch.as_tensor(edit.factor, dtype=new.dtype, device=new.device).view(shape)
            if attr == "weight":
                for k, d in edit.delta.items():
                    new.select(axis, k).add_(d.to(new))
            for k, value in edit.fresh.items():
                target = new.select(axis, k)
                if value is None or attr != "weight":
                    value = h.fresh(module, attr, target)
                target.copy_(value.to(target))
        if isinstance(old, nn.Parameter):
            p = nn.Parameter(new, requires_grad=old.requires_grad)
            setattr(module, attr, p)
            sf = torch.as_tensor(edit.state_factor, dtype=new.dtype, device=new.device)
            changes.append(ParamChange(old, p, axis, idx, sf))
        else:
            setattr(module, attr, new)
    h.set_size(module, dim, len(edit.index))
    return changes


def resize(module: nn.Module, out: int | None = None, inp: int | None = None) -> None:
    """Give ``module`` new (uninitialised) tensors for ``out`` output and ``inp`` input channels.

    Used to rebuild a grown architecture before loading its ``state_dict``.
    """
    h = _handler(module)
    for dim, n in (("out", out), ("in", inp)):
        if n is None:
            continue
        for attr, axis in h.tensors(module, dim):
            old = getattr(module, attr)
            shape = list(old.shape)
            shape[axis] = n
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad)
                    if isinstance(old, nn.Parameter) else new)
        h.set_size(module, dim, n)
