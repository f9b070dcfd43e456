"""Coupling groups: which layers change together when an output channel is duplicated.

Built on Torch-Pruning's ``DependencyGraph``: the pruning group of a layer's output channels lists exactly the
edits a split needs — the producing layer's rows, its norm entries, depthwise convs in between (``in = out``
coupled), residual-tied producers, and every consumer's input columns, with index maps through flatten,
concatenation and pooling.  A :class:`ChannelGroup` records, for each coupled module and dimension, the
positions of every root channel, so edits can be expressed as gathers (see :mod:`.handlers`).

Torch-Pruning gets some models only partly right; nas-split keeps what it gets right and refuses the rest layer by
layer, with the reason (:class:`NotGrowableError`): an op whose channel index map Torch-Pruning cannot build, or
builds wrong (a reshape that splits the channel dimension, as ShuffleNet's channel shuffle does, checked against the
traced shapes), refuses the groups through it; an error of Torch-Pruning while collecting one layer's group refuses
that layer.  Its warnings are replaced by one nas-split warning per cause.
"""
from __future__ import annotations

import contextlib
import math
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping as _tp_index_mapping
from torch_pruning.dependency import shape_infer as _tp_shape_infer

from ..errors import NasSplitError
from ..numerics import evaluating, like_model
from .handlers import handler_for

__all__ = ["NotGrowableError", "Slot", "ChannelGroup", "CouplingGraph"]

_OPT = tp.ops.OPTYPE
_PASS_OPS = {_OPT.ELEMENTWISE, _OPT.RESHAPE, _OPT.CONCAT}
_REFUSED_OPS = {_OPT.OUTPUT: "its channels are outputs of the model",
                _OPT.SPLIT: "its channels are split/chunked", _OPT.UNBIND: "its channels are unbound",
                _OPT.SLICE: "its channels are sliced", _OPT.EXPAND: "its channels are expanded",
                _OPT.LN: "a LayerNorm normalises over them", _OPT.GN: "a GroupNorm normalises over them",
                _OPT.IN: "an InstanceNorm is coupled to them",
                _OPT.EMBED: "an embedding is coupled to them", _OPT.MHA: "an attention layer is coupled to them",
                _OPT.LSTM: "an LSTM is coupled to them", _OPT.PRELU: "a PReLU is coupled to them",
                _OPT.CUSTOMIZED: "a customised layer is coupled to them"}

# Torch-Pruning's per-op index-map updates, looked up by ``index_mapping.update_index_mapping`` at each call
_TP_MAPPERS = ("update_concat_index_mapping", "update_split_index_mapping", "update_reshape_index_mapping",
               "update_unbind_index_mapping", "update_expand_index_mapping", "update_slice_index_mapping")
_TP_LOCK = threading.RLock()  # the guards below swap attributes of Torch-Pruning's index_mapping module

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
        self._unmapped: dict[tp.Node, str] = {}  # ops channels cannot pass (no or a wrong index map there): why
        outputs: list[torch.Tensor] = []
        try:
            with evaluating(model), warnings.catch_warnings(), _tolerant_index_maps(self._unmapped), \
                    torch.enable_grad():  # Torch-Pruning traces through autograd, also under a caller's no_grad
                # Torch-Pruning's warnings are handled here (verbose=False: free parameters, see
                # _warn_free_parameters; unknown ops, taken as elementwise, which the trial split checks); the
                # filter silences any other (its shape inference giving up, which the reshape check sees)
                warnings.filterwarnings("ignore", module=r"torch_pruning(\.|$)")
                self.dg = tp.DependencyGraph().build_dependency(model, like_model(model, example_inputs),
                                                                forward_fn=_forward(outputs), verbose=False)
        except _ForwardError as e:
            raise e.__cause__ from None  # the model's own error on these inputs, unchanged
        except Exception as e:  # noqa: BLE001 - a failure of the third-party tracer, with no layer to blame
            raise NotGrowableError(f"no layer of {type(model).__name__} is growable: Torch-Pruning cannot trace "
                                   f"its coupling graph ({type(e).__name__}: {e})") from e
        self.names = {m: n for n, m in model.named_modules()}
        self.modules = dict(model.named_modules())
        self._param_names = {p: n for n, p in model.named_parameters()}
        # Torch-Pruning marks only the last op of an output as one when another output is computed from it (timm's
        # features_only): the outputs' autograd functions tell all
        self._outputs = {t.grad_fn for t in outputs if t.grad_fn is not None}
        self._strides: dict[tp.Node, int] = {}  # positions per channel of each reshape that channels can pass
        for node in self.dg.module2node.values():
            if node.type == _OPT.RESHAPE and node not in self._unmapped:
                layout = self._reshape_layout(node)
                if isinstance(layout, str):
                    self._unmapped[node] = layout
                elif layout is not None:
                    self._strides[node] = layout
        for node in self._unmapped:  # groups stop at these ops (and are refused there) instead of mapping past them
            for dep in node.dependencies:
                dep.index_mapping[0] = _no_channels
        self._warn_free_parameters()

    def _warn_free_parameters(self) -> None:
        """One warning naming the traced parameters used outside any layer (ViT's ``pos_embed``, layer scales),
        instead of Torch-Pruning's, which says how it would prune them."""
        free = sorted(self._param_names.get(node.module, "?") for node in self.dg.module2node.values()
                      if node.type == _OPT.PARAMETER)
        if free:
            warnings.warn(f"nas-split: parameters {', '.join(free)} are used outside any layer, so the coupling "
                          "graph cannot edit them; layers whose channels meet them are not growable",
                          stacklevel=_caller_stacklevel())

    def _reshape_layout(self, node: tp.Node) -> int | str | None:
        """How channels pass the reshape ``node``: the number of positions each takes after it, or why they cannot
        pass (``None`` when this torch does not record the shapes: Torch-Pruning's map stands, the trial split of
        :func:`~nas_split.surgery.growable_layers` checks it).

        Torch-Pruning maps channels through a reshape as the identity or as a channel-major flatten (channel ``c``
        to positions ``c*k .. c*k+k-1``), which is right only when the reshape keeps the channel dimension whole or
        merges it with the dimensions after it.  Otherwise its map is silently wrong: ShuffleNet's channel shuffle
        views ``C`` channels as ``2 x C/2`` and transposes, a permutation that Torch-Pruning maps as the identity.
        The channel dimension is dimension 1 (NCHW), else the last one (NHWC, tokens), whichever has the channel
        count Torch-Pruning infers there.
        """
        fn, op = node.grad_fn, _op_name(node)
        src, meta = getattr(fn, "_saved_self_sym_sizes", None), getattr(fn, "_input_metadata", None)
        if src is None or not meta:
            return None
        src, dst = [int(n) for n in src], [int(n) for n in meta[0].shape]
        shapes = f"{op} {tuple(src)} -> {tuple(dst)}"
        inp = node.inputs[0] if node.inputs else None
        if inp is not None and inp.type == _OPT.PARAMETER:
            name = self._param_names.get(inp.module, "?")
            return f"meet the parameter {name!r} ({shapes}), which is outside any layer"
        channels = None if inp is None else _tp_shape_infer.infer_out_channels_recursively(self.dg, inp, [0])
        if channels is None or channels not in src[1:]:
            return f"pass through {shapes}, where Torch-Pruning does not know which dimension holds them"
        dim = 1 if src[1] == channels else (len(src) - 1 if src[-1] == channels else src.index(channels, 1))
        before, j, acc = math.prod(src[:dim]), 0, 1
        while j < len(dst) and (acc < before or (dst[j] == 1 and channels != 1)):
            acc, j = acc * dst[j], j + 1
        if acc != before or j == len(dst):
            return f"pass through {shapes}, which mixes them with the dimensions before them"
        if not any(math.prod(src[dim:k]) == dst[j] for k in range(dim + 1, len(src) + 1)):
            return f"pass through {shapes}, which splits their dimension into several"
        return dst[j] // channels

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
        try:
            with _index_maps_as_built():
                group = self.dg.get_pruning_group(m, fn, list(range(width)))
        except Exception as e:  # noqa: BLE001 - a failure of the third-party tracer on this layer only
            raise NotGrowableError(f"layer {name!r} is not growable: Torch-Pruning fails on its coupling group "
                                   f"({type(e).__name__}: {e})") from e
        slots, seen = [], set()
        for item in group.items:
            dep = item.dep
            node, handler = dep.target, dep.handler
            optype = node.type
            if node in self._unmapped:
                raise NotGrowableError(f"layer {name!r} is not growable: its channels {self._unmapped[node]}")
            if optype == _OPT.PARAMETER:
                raise NotGrowableError(f"layer {name!r} is not growable: its channels meet the parameter "
                                       f"{self._param_names.get(node.module, '?')!r}, which is outside any layer")
            if node in self._strides and set(Counter(int(r) for r in item.root_idxs).values()) != {self._strides[node]}:
                raise NotGrowableError(f"layer {name!r} is not growable: Torch-Pruning does not map each of its "
                                       f"channels to the {self._strides[node]} positions it takes after "
                                       f"{_op_name(node)}")
            if node.grad_fn in self._outputs and (optype in _PASS_OPS or self.dg.is_out_channel_pruning_fn(handler)):
                raise NotGrowableError(f"layer {name!r} is not growable: {_REFUSED_OPS[_OPT.OUTPUT]}")
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


class _ForwardError(Exception):
    """Carries (as ``__cause__``) an exception the model itself raised while being traced."""


def _forward(outputs: list[torch.Tensor]) -> Callable[[nn.Module, torch.Tensor], object]:
    """The forward function Torch-Pruning traces: records the output tensors in ``outputs``, and wraps an error of
    the model itself in :class:`_ForwardError`."""
    def forward(model: nn.Module, x: torch.Tensor) -> object:
        try:
            out = model(x)
        except Exception as e:
            raise _ForwardError from e
        outputs.extend(output_tensors(out))
        return out
    return forward


def output_tensors(output: object) -> list[torch.Tensor]:
    """The tensors of a model's output: a tensor, or lists, tuples and dicts of them (timm's ``features_only``)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, list | tuple):
        return [t for o in output for t in output_tensors(o)]
    return []


def _op_name(node: tp.Node) -> str:
    """A readable name of a functional op node: its autograd function, e.g. ``ViewBackward0``."""
    fn = node.grad_fn
    return fn.name() if fn is not None and hasattr(fn, "name") else type(node.module).__name__


def _no_channels(idxs: list) -> list:
    """An index map to no channel: Torch-Pruning stops collecting a group at an op that maps to nothing."""
    return []


@contextlib.contextmanager
def _tolerant_index_maps(failed: dict[tp.Node, str]) -> Iterator[None]:
    """While a graph is built, an op whose channel index map Torch-Pruning cannot build is recorded in ``failed``
    instead of failing the graph of the whole model.

    Torch-Pruning maps indices through every concat / split / reshape / ... op of the model in one pass; one op it
    cannot map (ShuffleNet's channel shuffle: ``ZeroDivisionError`` in the reshape update, as the shapes around a
    view to 5-D are not a flatten) would abort the build and with it the growability of every layer.
    """
    originals = {n: getattr(_tp_index_mapping, n) for n in _TP_MAPPERS}

    def guarded(fn):
        def update(graph: tp.DependencyGraph, node: tp.Node) -> None:
            try:
                fn(graph, node)
            except Exception as e:  # noqa: BLE001 - any failure of the third-party mapper refuses this op only
                failed[node] = (f"pass through {_op_name(node)}, where Torch-Pruning cannot map channel indices "
                                f"({type(e).__name__}: {e})")
        return update

    with _TP_LOCK:
        try:
            for n, fn in originals.items():
                setattr(_tp_index_mapping, n, guarded(fn))
            yield
        finally:
            for n, fn in originals.items():
                setattr(_tp_index_mapping, n, fn)


@contextlib.contextmanager
def _index_maps_as_built() -> Iterator[None]:
    """Collect groups with the index maps of the build: Torch-Pruning redoes the pass over the whole model for every
    group (needed after pruning changes widths, not on a graph that describes the model as traced), which is most of
    the time of a group on EfficientNet-B0 and would fail again on the ops :func:`_tolerant_index_maps` recorded."""
    with _TP_LOCK:
        original = _tp_index_mapping.update_index_mapping
        try:
            _tp_index_mapping.update_index_mapping = lambda graph: None
            yield
        finally:
            _tp_index_mapping.update_index_mapping = original


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside nas-split (and ``contextlib``, whose
    decorator wrappers nas-split uses)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("nas_split", "contextlib"):
        frame, level = frame.f_back, level + 1
    return level


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
