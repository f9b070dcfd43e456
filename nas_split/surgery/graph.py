"""Coupling groups: which layers change together when an output channel is duplicated.

Built on Torch-Pruning's ``DependencyGraph``: the pruning group of a layer's output channels lists exactly the
edits a split needs — the producing layer's rows, its norm entries, depthwise convs in between (``in = out``
coupled), residual-tied producers, and every consumer's input columns, with index maps through flatten,
concatenation and pooling.  A :class:`ChannelGroup` records, for each coupled module and dimension, the
positions of every root channel, so edits can be expressed as gathers (see :mod:`.handlers`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch_pruning as tp
from torch import nn

from ..errors import NasSplitError
from ..numerics import like_model
from .handlers import handler_for

__all__ = ["NotGrowableError", "Slot", "ChannelGroup", "CouplingGraph"]

_OPT = tp.ops.OPTYPE
_PASS_OPS = {_OPT.ELEMENTWISE, _OPT.RESHAPE, _OPT.CONCAT}
_REFUSED_OPS = {_OPT.OUTPUT: "its channels are outputs of the model",
                _OPT.SPLIT: "its channels are split/chunked", _OPT.UNBIND: "its channels are unbound",
                _OPT.SLICE: "its channels are sliced", _OPT.EXPAND: "its channels are expanded",
                _OPT.PARAMETER: "its channels meet an unwrapped parameter", _OPT.LN: "a LayerNorm normalises over them",
                _OPT.GN: "a GroupNorm normalises over them", _OPT.IN: "an InstanceNorm is coupled to them",
                _OPT.EMBED: "an embedding is coupled to them", _OPT.MHA: "an attention layer is coupled to them",
                _OPT.LSTM: "an LSTM is coupled to them", _OPT.PRELU: "a PReLU is coupled to them",
                _OPT.CUSTOMIZED: "a customised layer is coupled to them"}

Role = Literal["root", "producer", "depthwise", "norm", "consumer"]


class NotGrowableError(NasSplitError, ValueError):
    """A layer whose output channels cannot be split or added; the message says why."""


@dataclass(frozen=True)
class Slot:
    """One coupled (module, dimension): ``positions[c]`` are the indices along ``dim`` that carry root channel ``c``.

    ``dim`` is ``"out"`` (rows of a conv/linear, entries of a norm, filters of a depthwise conv) or ``"in"``
    (input columns of a consumer).
    """

    name: str
    module: nn.Module
    dim: Literal["out", "in"]
    role: Role
    positions: tuple[tuple[int, ...], ...]


@dataclass
class ChannelGroup:
    """All slots that change when an output channel of ``root`` is duplicated."""

    root: str
    width: int
    slots: list[Slot]

    @property
    def producers(self) -> list[str]:
        """Conv/linear layers whose output channels are these channels (several when residual-tied)."""
        return [s.name for s in self.slots if s.role in ("root", "producer")]

    def rebind(self, model: nn.Module) -> ChannelGroup:
        """The same group with its modules looked up by name in ``model`` (e.g. a deep copy)."""
        modules = dict(model.named_modules())
        return ChannelGroup(self.root, self.width, [Slot(s.name, modules[s.name], s.dim, s.role, s.positions)
                                                    for s in self.slots])

    def slot(self, name: str, dim: str) -> Slot:
        """The slot of module ``name`` on ``dim``."""
        for s in self.slots:
            if s.name == name and s.dim == dim:
                return s
        raise KeyError(f"{name} ({dim}) is not in the group of {self.root}")


class CouplingGraph:
    """Traces ``model`` once with ``example_inputs`` and answers coupling questions about its layers.

    The graph describes the model as traced: after surgery changes widths, build a new one.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor):
        self.model = model
        was = model.training
        model.eval()
        try:
            self.dg = tp.DependencyGraph().build_dependency(model, like_model(model, example_inputs))
        finally:
            model.train(was)
        self.names = {m: n for n, m in model.named_modules()}
        self.modules = dict(model.named_modules())

    def candidates(self) -> list[str]:
        """Conv and linear layers (not depthwise) in the traced graph, in module order."""
        return [n for n, m in self.modules.items() if _kind(m) == "dense" and m in self.dg.module2node]

    def group(self, name: str) -> ChannelGroup:
        """The coupling group of the output channels of layer ``name``; raises :class:`NotGrowableError`."""
        if name not in self.modules:
            raise NotGrowableError(f"layer {name!r} does not exist")
        m = self.modules[name]
        kind = _kind(m)
        if kind in (None, "norm"):
            raise NotGrowableError(f"layer {name!r} is a {type(m).__name__}, not a conv or linear layer")
        if kind == "depthwise":
            raise NotGrowableError(f"layer {name!r} is depthwise: its channels follow the layer before it")
        if kind == "grouped":
            raise NotGrowableError(f"layer {name!r} is a grouped convolution (groups={m.groups})")
        if m not in self.dg.module2node:
            raise NotGrowableError(f"layer {name!r} is not used in the forward pass")
        width = handler_for(m).sizes(m)[0]
        fn = self.dg.get_pruner_of_module(m).prune_out_channels
        group = self.dg.get_pruning_group(m, fn, list(range(width)))
        slots, seen = [], set()
        for item in group.items:
            dep = item.dep
            node, handler = dep.target, dep.handler
            optype = node.type
            if optype in _PASS_OPS:
                continue
            if optype in _REFUSED_OPS:
                raise NotGrowableError(f"layer {name!r} is not growable: {_REFUSED_OPS[optype]}")
            mod = node.module
            out = self.dg.is_out_channel_pruning_fn(handler)
            dim = "out" if out else "in"
            mname = self.names.get(mod, str(mod))
            if (mname, dim) in seen:
                raise NotGrowableError(f"layer {name!r} is not growable: {mname} takes its channels twice")
            seen.add((mname, dim))
            role = _role(mod, out, mod is m, name, mname)
            pos: list[list[int]] = [[] for _ in range(width)]
            for idx, r in zip(item.idxs, item.root_idxs, strict=True):
                pos[int(r)].append(int(idx))
            if any(not p for p in pos):
                raise NotGrowableError(f"layer {name!r} is not growable: the index map to {mname} is incomplete")
            slots.append(Slot(mname, mod, dim, role, tuple(tuple(p) for p in pos)))
        if not any(s.dim == "in" for s in slots):
            raise NotGrowableError(f"layer {name!r} is not growable: no layer consumes its channels "
                                   "(they are outputs of the model)")
        return ChannelGroup(name, width, slots)


def _kind(m: nn.Module) -> str | None:
    h = handler_for(m)
    return None if h is None else h.kind(m)


def _role(mod: nn.Module, out: bool, is_root: bool, root: str, mname: str) -> Role:
    if is_root and out:
        return "root"  # the same layer may also read these channels (a residual stream it writes): a consumer
    kind = _kind(mod)
    if kind in ("norm", "depthwise"):
        return kind
    if kind == "grouped":
        raise NotGrowableError(f"layer {root!r} is not growable: grouped convolution {mname} is coupled to it")
    if kind == "dense":
        return "producer" if out else "consumer"
    raise NotGrowableError(f"layer {root!r} is not growable: {type(mod).__name__} {mname} is coupled to it (no "
                           "channel handler; see nas_split.surgery.handlers.register_handler)")
