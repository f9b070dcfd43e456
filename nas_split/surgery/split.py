"""Function-preserving width changes: split output channels into weighted copies, or add new channels.

**Split** of channel ``c`` of layer ℓ (parameters θ = its weight row) into copies ``i = 0..m-1`` with weights
``w_i`` (any sign, ``Σ w_i = 1``) and displacements ``δ_i``:

* layer ℓ: copy ``i`` gets ``θ + ε δ_i`` (copy 0 stays at position ``c``; copies 1.. are appended after the
  layer's channels in plan order); the bias, if any, is copied;
* everything coupled to the channel (norm entries incl. running statistics, depthwise filters in between,
  residual-tied producers, whose rows are copied without displacement) is duplicated unchanged;
* every consumer's input columns of copy ``i`` are the original columns times ``w_i``.

At ε = 0 the network computes the same function (all copies are equal and ``Σ w_i = 1``).  For a residual
stream (MobileNetV2 identity skips) the rule is the same: the channel is duplicated in every tied layer, so all
adds stay valid, and only the named layer's rows are displaced.

**Add** ``k`` new channels to layer ℓ: given fan-in rows for ℓ (zero if not given), identity norm entries
(γ=1, β=0, μ=0, σ²=1), identity depthwise filters (centre tap 1), zero rows in tied producers, and given fan-out
columns in the consumers (zero if not given).  The function is preserved when the fan-out is zero, or the
fan-in is zero and the activation maps 0 to 0.

**Optimizer state** follows the weights (see :mod:`.optim`): entries of untouched channels are kept bit for bit,
copies inherit their parent's state, new channels start at zero.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .graph import ChannelGroup, CouplingGraph, Slot
from .handlers import DimEdit, ParamChange, apply_edit
from .optim import carry_optimizer_state
from .sizes import refresh_feature_info

__all__ = ["SplitScheme", "NewChannels", "SplitRecord", "SplitReport", "split", "split_groups", "add_channels",
           "fan_in_shape"]


@dataclass(frozen=True)
class SplitScheme:
    """How one neuron is split: copy weights ``w_i`` (``Σ w_i = 1``) and unit displacements ``δ_i``.

    ``directions`` has shape ``(m, *fan_in_shape)``; ``None`` draws a random unit ``v`` (and ``u``) and uses
    ``(+v, -v)`` for 2 copies, ``(0, +v, -v)`` for 3 and ``(+v, -v, +u, -u)`` for 4.
    """

    weights: tuple[float, ...]
    directions: torch.Tensor | None = None

    @staticmethod
    def s2d(direction: torch.Tensor | None = None) -> SplitScheme:
        """S2D: two copies, weights ½, displacements ``±v`` (random unit ``v`` if none)."""
        d = None if direction is None else torch.stack([direction, -direction])
        return SplitScheme((0.5, 0.5), d)

    @property
    def copies(self) -> int:
        """Number of copies ``m`` (the neuron is replaced by ``m`` neurons: ``m - 1`` new ones)."""
        return len(self.weights)


@dataclass(frozen=True)
class NewChannels:
    """``k`` new output channels: ``fan_in`` ``(k, *fan_in_shape)`` and per-consumer ``fan_out``
    ``{consumer name: (k, *column_shape)}`` (a consumer's column is ``weight[:, j]``); missing parts are zero."""

    count: int
    fan_in: torch.Tensor | None = None
    fan_out: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SplitRecord:
    """What happened to one channel: its new positions in the layer and the scheme used."""

    layer: str
    channel: int
    positions: list[int]
    weights: tuple[float, ...]

    @property
    def new_neurons(self) -> int:
        """Neurons added by this split."""
        return len(self.positions) - 1


@dataclass
class SplitReport:
    """Result of :func:`split` / :func:`add_channels`."""

    records: list[SplitRecord]
    widths: dict[str, tuple[int, int]]  # layer -> (old width, new width)
    dropped: list[tuple[str, int]]      # (layer, channel) removed from the plan by caps or rounding
    changes: list[ParamChange] = field(default_factory=list, repr=False)

    @property
    def new_neurons(self) -> int:
        """Neurons added in all layers."""
        return sum(new - old for old, new in self.widths.values())


def fan_in_shape(layer: nn.Module) -> tuple[int, ...]:
    """Shape of one neuron's fan-in (a weight row): ``(in/groups, *kernel)`` or ``(in_features,)``."""
    return tuple(layer.weight.shape[1:])


PlanEntry = int | tuple[int, SplitScheme]


def _normalise(plan: Mapping[str, Sequence[PlanEntry]]) -> dict[str, list[tuple[int, SplitScheme]]]:
    out = {}
    for layer, entries in plan.items():
        if isinstance(entries, int | tuple):
            entries = [entries]
        items = []
        for e in entries:
            c, s = (e, SplitScheme.s2d()) if not isinstance(e, tuple) else e
            if isinstance(c, torch.Tensor):
                c = int(c)
            if not isinstance(c, int) or isinstance(c, bool):
                raise ValueError(f"{layer}: channel {c!r} is not an integer")
            if not isinstance(s, SplitScheme):
                raise ValueError(f"{layer}: channel {c}: scheme must be a SplitScheme, got {type(s).__name__}")
            items.append((c, s))
        out[layer] = items
    return out


def _check_scheme(layer: str, c: int, s: SplitScheme, row: tuple[int, ...]) -> None:
    if s.copies < 2:
        raise ValueError(f"{layer}[{c}]: a split needs at least 2 copies, got {s.copies}")
    if not all(math.isfinite(w) for w in s.weights) or abs(sum(s.weights) - 1.0) > 1e-6:
        raise ValueError(f"{layer}[{c}]: copy weights {tuple(s.weights)} must be finite and sum to 1 "
                         f"(they sum to {sum(s.weights):.6g})")
    if s.directions is not None and tuple(s.directions.shape) != (s.copies, *row):
        raise ValueError(f"{layer}[{c}]: directions have shape {tuple(s.directions.shape)}, "
                         f"expected {(s.copies, *row)} (copies x fan-in)")
    if s.directions is None and s.copies > 4:
        raise ValueError(f"{layer}[{c}]: give directions for a split into {s.copies} copies")


def _default_directions(m: int, row: tuple[int, ...], gen: torch.Generator | None) -> torch.Tensor:
    v = torch.randn(row, generator=gen)
    v /= v.norm().clamp_min(1e-12)
    if m == 2:
        return torch.stack([v, -v])
    if m == 3:
        return torch.stack([torch.zeros_like(v), v, -v])
    u = torch.randn(row, generator=gen)
    u /= u.norm().clamp_min(1e-12)
    return torch.stack([v, -v, u, -u])


def _caps(layer: str, width: int, items: list, max_width: int | Mapping[str, int] | None,
          round_to: int | None) -> tuple[list, list]:
    """Trim trailing plan entries so the new width respects ``max_width`` and is a multiple of ``round_to``."""
    cap = max_width.get(layer) if isinstance(max_width, Mapping) else max_width
    kept = list(items)

    def grown(k):
        return width + sum(s.copies - 1 for _, s in k)

    if cap is not None:
        while kept and grown(kept) > cap:
            kept.pop()
    if round_to:
        target = grown(kept) // round_to * round_to
        while kept and grown(kept) > target:
            kept.pop()
        while kept and grown(kept) % round_to:
            kept.pop()
    return kept, [(layer, c) for c, _ in items[len(kept):]]


class _Edits:
    """Collects insertions and in-place factors per (module, dim) and compiles them into :class:`DimEdit`s."""

    def __init__(self):
        self.slots: dict[tuple[str, str], Slot] = {}
        self.size: dict[tuple[str, str], int] = {}
        self.inplace: dict[tuple[str, str], dict[int, tuple[float, float, torch.Tensor | None]]] = {}
        self.blocks: dict[tuple[str, str], dict[int, list]] = {}

    def touch(self, slot: Slot) -> tuple[str, str]:
        key = (slot.name, slot.dim)
        self.slots[key] = slot
        w = slot.module.weight.shape[1 if slot.dim == "in" else 0]
        self.size[key] = w
        self.inplace.setdefault(key, {})
        self.blocks.setdefault(key, {})
        return key

    def compile(self) -> dict[tuple[str, str], DimEdit]:
        edits = {}
        for key, size in self.size.items():
            e = DimEdit([], [], [])
            for p in range(size):
                f, sf, d = self.inplace[key].get(p, (1.0, 1.0, None))
                self._emit(e, p, f, sf, d, None, False)
                for entry in self.blocks[key].get(p, []):
                    self._emit(e, *entry)
            edits[key] = e
        return edits

    @staticmethod
    def _emit(e: DimEdit, src, f, sf, d, fresh, is_fresh):
        k = len(e.index)
        e.index.append(src)
        e.factor.append(f)
        e.state_factor.append(sf)
        if d is not None:
            e.delta[k] = d
        if is_fresh:
            e.fresh[k] = fresh


def _plan_split(edits: _Edits, group: ChannelGroup, items: list[tuple[int, SplitScheme]], eps: float,
                gen: torch.Generator | None) -> list[SplitRecord]:
    root = group.slot(group.root, "out")
    row = fan_in_shape(root.module)
    width = group.width
    records = {c: SplitRecord(group.root, c, [c], s.weights) for c, s in items}
    new_pos = width
    for c, s in items:
        records[c].positions += list(range(new_pos, new_pos + s.copies - 1))
        new_pos += s.copies - 1
    dirs = {c: (s.directions if s.directions is not None else _default_directions(s.copies, row, gen))
            for c, s in items}
    for slot in group.slots:
        key = edits.touch(slot)
        anchor = max(p for ps in slot.positions for p in ps)
        block = edits.blocks[key].setdefault(anchor, [])
        out = slot.dim == "out"
        for c, s in items:
            w = s.weights
            for j in range(s.copies):
                f = 1.0 if out else w[j]  # consumers weight the copies' columns
                sf = w[j] if out else 1.0  # gradients of a copy's rows scale with its weight (see optim)
                d = eps * dirs[c][j] if (slot.role == "root" and eps != 0.0) else None
                for p in slot.positions[c]:
                    if j == 0:
                        edits.inplace[key][p] = (f, sf, d)
                    else:
                        block.append((p, f, sf, d, None, False))
    return [records[c] for c, _ in items]


def _validate(graph: CouplingGraph, plan: dict[str, list]) -> dict[str, ChannelGroup]:
    groups, owner = {}, {}
    for layer, items in plan.items():
        group = graph.group(layer)  # NotGrowableError names the problem
        for p in group.producers:
            if p in owner and owner[p] != layer:
                raise ValueError(f"layers {owner[p]!r} and {layer!r} share their output channels (residual-tied); "
                                 "name only one of them in a plan")
            owner[p] = layer
        seen = set()
        for c, _ in items:
            if not 0 <= c < group.width:
                raise IndexError(f"{layer}: channel {c} out of range [0, {group.width})")
            if c in seen:
                raise ValueError(f"{layer}: channel {c} is listed twice")
            seen.add(c)
        groups[layer] = group
    return groups


def _apply(model: nn.Module, edits: _Edits, optimizer: torch.optim.Optimizer | None,
           example_inputs: torch.Tensor) -> list[ParamChange]:
    changes = []
    compiled = edits.compile()
    # a new column of a layer whose rows change in the same call follows the row gather (new rows get 0)
    for (name, dim), e in compiled.items():
        rows = compiled.get((name, "out"))
        if dim == "in" and rows is not None:
            for k, value in e.fresh.items():
                if value is not None:
                    col = value.index_select(0, torch.as_tensor(rows.index))
                    for r in rows.fresh:
                        col[r] = 0
                    e.fresh[k] = col
    # rows before columns: a layer that is split (rows displaced, fan-in shaped as now) and also consumes another
    # split (columns spread over copies) gets its displaced rows' columns spread too
    for (name, dim), e in sorted(compiled.items(), key=lambda kv: kv[0][1] != "out"):
        changes += apply_edit(edits.slots[(name, dim)].module, dim, e)
    if optimizer is not None:
        carry_optimizer_state(optimizer, changes)
    refresh_feature_info(model, example_inputs)  # timm models record per-stage widths (cf. timm #2370)
    return changes


def split(model: nn.Module, example_inputs: torch.Tensor, plan: Mapping[str, Sequence[PlanEntry]],
          eps: float = 1e-2, optimizer: torch.optim.Optimizer | None = None,
          max_width: int | Mapping[str, int] | None = None, round_to: int | None = None,
          graph: CouplingGraph | None = None, generator: torch.Generator | None = None) -> SplitReport:
    """Split output channels of layers of ``model`` in place (see the module docstring for the rule).

    Args:
        model: any ``nn.Module``; ``example_inputs`` is traced to find coupled layers.
        plan: ``{layer name: [channel, ...]}`` (S2D with a random direction) or
            ``{layer name: [(channel, SplitScheme), ...]}``; channels are listed by priority.
        eps: step ε of the displacements (``θ_i = θ + ε δ_i``); 0 keeps the function exactly.
        optimizer: its state (momentum, Adam moments) is carried to the new parameters.
        max_width: a per-layer cap (int, or ``{layer: cap}``); trailing plan entries beyond it are dropped.
        round_to: drop trailing entries until each grown width is a multiple of this number.
        graph: a :class:`CouplingGraph` of the model as it is now (built if not given).
        generator: random source of default directions.

    Raises:
        NotGrowableError, IndexError, ValueError: before anything is changed.
    """
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    norm = _normalise(plan)
    graph = graph or CouplingGraph(model, example_inputs)
    groups = _validate(graph, norm)
    for layer, items in norm.items():
        row = fan_in_shape(graph.modules[layer])
        for c, s in items:
            _check_scheme(layer, c, s, row)
    return split_groups(model, example_inputs, groups, norm, eps, optimizer, max_width, round_to, generator)


def split_groups(model: nn.Module, example_inputs: torch.Tensor, groups: Mapping[str, ChannelGroup],
                 plan: Mapping[str, list[tuple[int, SplitScheme]]], eps: float,
                 optimizer: torch.optim.Optimizer | None = None, max_width: int | Mapping[str, int] | None = None,
                 round_to: int | None = None, generator: torch.Generator | None = None) -> SplitReport:
    """:func:`split` for a validated plan with its coupling groups already computed (no tracing)."""
    norm = dict(plan)
    dropped: list[tuple[str, int]] = []
    if max_width is not None or round_to:
        for layer in norm:
            norm[layer], d = _caps(layer, groups[layer].width, norm[layer], max_width, round_to)
            dropped += d
    edits = _Edits()
    records = []
    for layer, items in norm.items():
        if items:
            records += _plan_split(edits, groups[layer], items, eps, generator)
    changes = _apply(model, edits, optimizer, example_inputs)
    widths = {layer: (groups[layer].width, groups[layer].width + sum(s.copies - 1 for _, s in items))
              for layer, items in norm.items()}
    return SplitReport(records, widths, dropped, changes)


def add_channels(model: nn.Module, example_inputs: torch.Tensor, additions: Mapping[str, NewChannels],
                 optimizer: torch.optim.Optimizer | None = None, graph: CouplingGraph | None = None) -> SplitReport:
    """Append new output channels to layers of ``model`` in place (see the module docstring for the rule)."""
    graph = graph or CouplingGraph(model, example_inputs)
    groups = _validate(graph, {layer: [] for layer in additions})
    for layer, new in additions.items():
        g = groups[layer]
        if new.count < 1:
            raise ValueError(f"{layer}: count must be >= 1, got {new.count}")
        row = fan_in_shape(graph.modules[layer])
        if new.fan_in is not None and tuple(new.fan_in.shape) != (new.count, *row):
            raise ValueError(f"{layer}: fan_in has shape {tuple(new.fan_in.shape)}, expected {(new.count, *row)}")
        consumers = {s.name: s for s in g.slots if s.role == "consumer"}
        for cname, t in new.fan_out.items():
            if cname not in consumers:
                raise ValueError(f"{layer}: {cname!r} is not a consumer of its channels; consumers: "
                                 f"{sorted(consumers)}")
            s = consumers[cname]
            if len(s.positions[0]) != 1:
                raise ValueError(f"{layer}: consumer {cname!r} reads each channel at {len(s.positions[0])} "
                                 "positions (flatten); only a zero fan-out is supported there")
            col = tuple(s.module.weight[:, 0].shape)
            if tuple(t.shape) != (new.count, *col):
                raise ValueError(f"{layer}: fan_out[{cname!r}] has shape {tuple(t.shape)}, "
                                 f"expected {(new.count, *col)}")
    edits = _Edits()
    records = []
    for layer, new in additions.items():
        g = groups[layer]
        for slot in g.slots:
            key = edits.touch(slot)
            anchor = max(p for ps in slot.positions for p in ps)
            block = edits.blocks[key].setdefault(anchor, [])
            src = slot.positions[0]
            for j in range(new.count):
                if slot.role == "root":
                    value = None if new.fan_in is None else new.fan_in[j]
                    fresh = value if value is not None else torch.zeros(fan_in_shape(slot.module))
                elif slot.role == "consumer":
                    t = new.fan_out.get(slot.name)
                    fresh = t[j] if t is not None else torch.zeros_like(slot.module.weight[:, 0])
                elif slot.role == "producer":
                    fresh = torch.zeros(fan_in_shape(slot.module))
                else:
                    fresh = None  # identity norm / depthwise entries
                for p in src:
                    block.append((p, 1.0, 0.0, None, fresh, True))
        records += [SplitRecord(layer, -1, [g.width + j], ()) for j in range(new.count)]
    changes = _apply(model, edits, optimizer, example_inputs)
    widths = {layer: (groups[layer].width, groups[layer].width + new.count) for layer, new in additions.items()}
    return SplitReport(records, widths, [], changes)
