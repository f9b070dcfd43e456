"""Anytime networks from growth: every growth stage's widths kept as a *level*, a prefix sub-network of the grown
model that can run, train and be exported on its own (Wan, Hoffmann, Lu & Maire, "Orthogonalized SGD and Nested
Architectures for Anytime Neural Networks", ICML 2020; the API follows Slimmable Networks and Once-for-All).

**Levels.**  Level ``k`` is the ``{layer: output width}`` of :func:`~nas_split.surgery.sizes.layer_widths` after
growth stage ``k`` (level 0: the seed); :func:`add_level` appends the model's current widths.  Every growth method
places new channels after the old ones in each coupled tensor (the surgery's edits insert a group's new channels
after the last position of its old ones: rows, norm entries, depthwise filters, consumer columns, also inside a
flatten or a concatenation), so the network of an earlier level is the grown one restricted to the first
``w_k`` channels of every coupling group: rows ``[:w_k]`` of the producers, their norms and depthwise filters, and
the consumer columns that carry those channels (a flatten consumer: ``w_k · H W`` of them).  Whether that prefix
still computes the earlier level's function after growth depends on the method (see ``docs/anytime.md``):
methods that leave the old channels alone (GradMax, new neurons with any fan-in) or rescale them exactly (``vt``)
keep it; splitting halves (S2D) or reweights (S3D) the parent's fan-out and displaces it by ``ε v``, so its prefix
is a perturbed earlier network.

**Running a level** (:func:`set_level`): the model's conv / linear / norm layers see slices of their own
parameters, taken in a forward pre-hook at every call (so autograd reaches the full parameters, and several
levels can be trained on them in one step), placed in the module's instance ``__dict__``, where they shadow the
registered parameters for attribute access while ``parameters()``, ``state_dict()`` and the optimizer keep the
full tensors; depthwise convs get ``groups = w_k``.  The sliced model computes only the level's channels, so a
level's forward costs that level's MACs.

**Batch norm per level.**  A channel's batch statistics depend on the level (its inputs differ), so every norm
with running statistics has private statistics per level (Slimmable Networks' switchable batch norm): the top
level (the full model) keeps them in the modules' buffers, every earlier level in the model's level record; a
level's forward in train mode updates its own.  :func:`recalibrate` recomputes a level's statistics from a few
batches instead (US-Nets' post-training recalibration).  A growth step that rescales a norm's input by ``β`` keeps
the function only by scaling the running mean by ``β`` and the running variance and ``ε`` by ``β²`` (variance
transfer, :mod:`nas_split.growth.variance`); :func:`add_level` applies the same scale, read from the change of
``ε``, to every earlier level's statistics.

**Stored with the model.**  The levels live in ``model.nas_split_levels`` (plain data: widths, statistics, the
example input's shape for tracing), which :func:`~nas_split.surgery.export.save_grown` writes and
:func:`~nas_split.surgery.export.load_grown` restores, so a loaded model can :func:`set_level` and :func:`extract`
without its run directory.  :func:`extract` returns a standalone model of a level's widths and weights, with
levels ``0..k`` of its own.
"""
from __future__ import annotations

import copy
import itertools
import math
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import NasSplitError
from .numerics import evaluating, like_model
from .surgery.graph import CouplingGraph, NotGrowableError
from .surgery.handlers import DimEdit, apply_edit, handler_for, is_depthwise
from .surgery.sizes import layer_sizes, layer_widths, refresh_feature_info

__all__ = ["LevelError", "LevelSwitch", "add_level", "levels", "set_level", "extract", "recalibrate", "ATTR",
           "FORMAT"]

ATTR = "nas_split_levels"
FORMAT = "nas-split-levels/1"
_STATS = ("running_mean", "running_var", "num_batches_tracked")


class LevelError(NasSplitError, ValueError):
    """A level that does not exist or does not fit the model; the message says why."""


@dataclass(frozen=True)
class _Plan:
    """How the current model runs at one level: the kept indices of every narrowed (module, dimension), the
    ``groups`` of narrowed depthwise convs, and the kept entries of every norm with running statistics (``None``:
    all of them)."""

    keep: dict[str, dict[str, torch.Tensor]]
    groups: dict[str, int]
    norms: dict[str, torch.Tensor | None]


_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Plan]] = weakref.WeakKeyDictionary()
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, LevelSwitch] = weakref.WeakKeyDictionary()


def _record(model: nn.Module) -> dict[str, Any]:
    record = getattr(model, ATTR, None)
    if not isinstance(record, dict) or record.get("format") != FORMAT or not record.get("levels"):
        raise LevelError(f"this {type(model).__name__} has no levels: call nas_split.anytime.add_level(model, x) at "
                         "the seed and after every growth step")
    return record


def levels(model: nn.Module) -> list[dict[str, int]]:
    """The widths of every level of ``model``, smallest first (empty for a model without levels)."""
    record = getattr(model, ATTR, None)
    return [dict(lv["widths"]) for lv in record["levels"]] if isinstance(record, dict) else []


def _index(record: dict[str, Any], level: int) -> int:
    n = len(record["levels"])
    if isinstance(level, bool) or not isinstance(level, int) or not -n <= level < n:
        raise LevelError(f"level must be an integer in [{-n}, {n}), got {level!r}")
    return level % n


def _norms(model: nn.Module) -> dict[str, nn.Module]:
    """Every norm of ``model`` with running statistics, by name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None}


def _probe(model: nn.Module, record: dict[str, Any], example_inputs: torch.Tensor | None) -> torch.Tensor:
    """Inputs to trace ``model`` with: ``example_inputs``, or random ones of the shape its levels recorded."""
    if example_inputs is not None:
        return example_inputs
    shape = record.get("input_shape")
    if shape is None:
        raise LevelError("pass example_inputs: this model's levels record no input shape")
    return like_model(model, torch.randn((2, *shape), generator=torch.Generator().manual_seed(0)))


def _plan(model: nn.Module, widths: dict[str, int], example_inputs: torch.Tensor | None,
          record: dict[str, Any]) -> _Plan:
    """The :class:`_Plan` of ``widths`` on ``model`` as it is now (cached per model, level and model sizes)."""
    sizes = layer_sizes(model)
    key = (tuple(sorted(widths.items())), tuple((n, tuple(s)) for n, s in sorted(sizes.items())))
    cache = _PLANS.setdefault(model, {})
    if key not in cache:
        cache[key] = _build_plan(model, widths, sizes, example_inputs, record)
    return cache[key]


def _build_plan(model: nn.Module, widths: dict[str, int], sizes: dict[str, list[int]],
                example_inputs: torch.Tensor | None, record: dict[str, Any]) -> _Plan:
    current = layer_widths(model)
    if set(widths) != set(current):
        odd = sorted(set(widths) ^ set(current))
        raise LevelError(f"the level's layers are not the model's: {', '.join(odd[:3])} "
                         f"{'...' if len(odd) > 3 else ''}".rstrip())
    wider = sorted(n for n in current if widths[n] > current[n])
    if wider:
        raise LevelError(f"the level is wider than the model at {', '.join(wider[:3])}")
    changed = {n for n in current if widths[n] != current[n]}
    dropped: dict[tuple[str, str], set[int]] = {}
    if changed:
        graph = CouplingGraph(model, _probe(model, record, example_inputs))
        covered: set[str] = set()
        for name in graph.candidates():
            if name in covered or name not in changed:
                continue
            try:
                group = graph.group(name)
            except NotGrowableError as e:
                raise LevelError(f"layer {name!r} is narrower at this level, but {e}") from None
            w = widths[name]
            for s in group.slots:
                if s.dim == "out" and s.role != "norm":
                    if widths[s.name] != w:
                        raise LevelError(f"layers {name!r} and {s.name!r} share their channels, but the level gives "
                                         f"them widths {w} and {widths[s.name]}")
                    covered.add(s.name)
                dropped.setdefault((s.name, s.dim), set()).update(p for c in range(w, group.width)
                                                                  for p in s.positions[c])
        if changed - covered:
            raise LevelError(f"layers {', '.join(sorted(changed - covered)[:3])} are narrower at this level but no "
                             "coupling group of the model narrows them")
    modules = dict(model.named_modules())
    keep: dict[str, dict[str, torch.Tensor]] = {}
    for (name, dim), gone in dropped.items():
        n = sizes[name][0 if dim == "out" else 1]
        keep.setdefault(name, {})[dim] = torch.as_tensor([i for i in range(n) if i not in gone], dtype=torch.long)
    groups = {n: len(d["out"]) for n, d in keep.items() if "out" in d and is_depthwise(modules[n])}
    norms = {n: keep.get(n, {}).get("out") for n in _norms(model)}
    return _Plan(keep, groups, norms)


def _check_top(model: nn.Module, record: dict[str, Any]) -> None:
    if record["levels"][-1]["widths"] != layer_widths(model):
        raise LevelError("the model's widths are not those of its last level: call add_level(model, x) after "
                         "every growth step")


def _cut(t: torch.Tensor, cuts: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """``t`` restricted to indices ``idx`` along each ``axis`` of ``cuts`` (a view for a prefix)."""
    for axis, idx in cuts:
        n = idx.numel()
        t = t.narrow(axis, 0, n) if int(idx[-1]) == n - 1 else t.index_select(axis, idx.to(t.device))
    return t


def _original(m: nn.Module, attr: str) -> torch.Tensor:
    return m._parameters[attr] if attr in m._parameters else m._buffers[attr]


class LevelSwitch:
    """The model running at one level (see :func:`set_level`); a context manager whose exit gives back the level
    that was active when it was made (the full model if none)."""

    def __init__(self, model: nn.Module, level: int, plan: _Plan, stats: dict[str, dict[str, torch.Tensor]],
                 previous: LevelSwitch | None):
        self._model, self.level, self._previous = weakref.ref(model), level, previous  # no cycle via _ACTIVE
        self._plan, self._stats = plan, stats
        self._hooks: list[Any] = []
        self._shadows: list[tuple[nn.Module, str]] = []
        self._groups: dict[nn.Module, int] = {}
        self._entered = self._closed = False

    @property
    def model(self) -> nn.Module:
        """The switched model."""
        return self._model()

    def __enter__(self) -> nn.Module:
        self._entered = True
        return self.model

    def __exit__(self, *exc: object) -> None:
        if self._closed:
            return
        self._closed = True
        active = _ACTIVE.pop(self.model, None)  # this switch, or a plain call's made inside the block
        if active is not None:
            active._uninstall()
        if self._previous is not None:
            self._previous._install()
            _ACTIVE[self.model] = self._previous

    def _install(self) -> None:
        modules = dict(self.model.named_modules())
        for name, dims in self._plan.keep.items():
            m = modules[name]
            h = handler_for(m)
            cuts: dict[str, list[tuple[int, torch.Tensor]]] = {}
            for dim, idx in dims.items():
                for attr, axis in h.tensors(m, dim):
                    if attr not in _STATS:
                        cuts.setdefault(attr, []).append((axis, idx.to(_original(m, attr).device)))
            hook = _slicer(list(cuts.items()))
            hook(m, ())
            self._hooks.append(m.register_forward_pre_hook(hook, prepend=True))
            self._shadows += [(m, attr) for attr in cuts]
        for name, groups in self._plan.groups.items():
            m = modules[name]
            self._groups[m] = m.groups
            m.groups = groups
        for name, stats in self._stats.items():
            m = modules[name]
            for attr, t in stats.items():
                m.__dict__[attr] = t
                self._shadows.append((m, attr))

    def _uninstall(self) -> None:
        for h in self._hooks:
            h.remove()
        for m, attr in self._shadows:
            m.__dict__.pop(attr, None)
        for m, groups in self._groups.items():
            m.groups = groups
        self._hooks, self._shadows, self._groups = [], [], {}


def _slicer(cuts: list[tuple[str, list[tuple[int, torch.Tensor]]]]):
    """A forward pre-hook that shadows each tensor of ``cuts`` with its slice, taken anew at every call."""
    def hook(m: nn.Module, _args: tuple) -> None:
        for attr, c in cuts:
            m.__dict__[attr] = _cut(_original(m, attr), c)
    return hook


@contextmanager
def _full(model: nn.Module) -> Iterator[LevelSwitch | None]:
    """The block runs on the full model; a switched level is put back afterwards."""
    active = _ACTIVE.get(model)
    if active is not None:
        active._uninstall()
    try:
        yield active
    finally:
        if active is not None:
            active._install()


def _level_stats(model: nn.Module, level: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The level's private statistics, moved (in the record, so updates persist) to each norm's device and dtype."""
    norms = _norms(model)
    stats = level.get("stats", {})
    for name, entry in stats.items():
        m = norms[name]
        for attr in _STATS:
            buf, t = getattr(m, attr), entry.get(attr)
            if t is not None and buf is not None and (t.device, t.dtype) != (buf.device, buf.dtype):
                entry[attr] = t.to(buf)
    return stats


def set_level(model: nn.Module, level: int, example_inputs: torch.Tensor | None = None) -> LevelSwitch:
    """Run ``model`` as its level ``level`` (``-1``: the last, the full model) until the switch is undone.

    Use it as a context manager (``with set_level(model, k): ...`` gives back the previous level, or the full
    model, on exit) or call it to switch (``set_level(model, -1)`` switches back).  Every coupled layer computes
    the first ``w_k`` channels of its group, consumers read only those (see the module docstring), and norms use
    the level's own running statistics.  Gradients reach the full parameters (zero outside the level).

    Args:
        example_inputs: inputs to trace the coupling graph with (default: random inputs of the shape recorded by
            :func:`add_level`); traced once per level and model widths.

    Raises:
        LevelError: no such level, or the model grew since its last :func:`add_level`.
    """
    record = _record(model)
    k = _index(record, level)
    previous = _ACTIVE.get(model)
    if previous is not None:
        previous._uninstall()
    try:
        _check_top(model, record)
        plan = _plan(model, record["levels"][k]["widths"], example_inputs, record)
        stats = _level_stats(model, record["levels"][k])
    except BaseException:
        if previous is not None:
            previous._install()
        raise
    if previous is not None and not previous._entered:  # a plain call's switch is replaced, never given back:
        previous._previous = None  # what it replaced is not needed any more (plain calls keep no chain)
    switch = LevelSwitch(model, k, plan, stats, previous)
    switch._install()
    _ACTIVE[model] = switch
    return switch


def add_level(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Record ``model``'s current widths as its next level (the first call: level 0, the seed); returns its index.

    Call it at the seed and after every growth step, before training goes on.  The level that was last until now
    keeps its running statistics as private ones (the modules' buffers, which growth may have rescaled, at that
    level's entries), earlier levels' statistics follow any rescaling of a norm's input (see the module
    docstring), and the new last level uses the modules' buffers.
    """
    active = _ACTIVE.get(model)
    if active is not None and (active._plan.keep or active._stats):
        raise LevelError("add_level on a model running at an earlier level: switch back to the full model first")
    record = getattr(model, ATTR, None)
    if record is None:
        setattr(model, ATTR, {"format": FORMAT, "input_shape": [int(d) for d in example_inputs.shape[1:]],
                              "levels": [{"widths": layer_widths(model)}]})
        return 0
    record = _record(model)
    norms = _norms(model)
    for lv in record["levels"][:-1]:
        _rescale(lv, norms)
    top = record["levels"][-1]
    plan = _plan(model, top["widths"], example_inputs, record)
    top["stats"] = {n: _snapshot(m, plan.norms[n]) for n, m in norms.items()}
    top["eps"] = {n: float(m.eps) for n, m in norms.items()}
    record["levels"].append({"widths": layer_widths(model)})
    return len(record["levels"]) - 1


def _snapshot(m: nn.Module, idx: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Copies of a norm's running statistics at entries ``idx`` (all if ``None``)."""
    out = {}
    for attr in _STATS:
        t = getattr(m, attr)
        if t is not None:
            out[attr] = t.detach().clone() if idx is None or t.dim() == 0 else t.index_select(0, idx.to(t.device))
    return out


@torch.no_grad()
def _rescale(level: dict[str, Any], norms: dict[str, nn.Module]) -> None:
    """Scale a level's statistics of every norm whose ``ε`` changed by ``β²`` since they were taken: mean by ``β``,
    variance by ``β²`` (the function-preserving rescaling of the norm's input, see the module docstring)."""
    for name, eps in level["eps"].items():
        now = float(norms[name].eps)
        if now != eps:
            s = now / eps
            entry = level["stats"][name]
            entry["running_mean"] = entry["running_mean"] * math.sqrt(s)
            entry["running_var"] = entry["running_var"] * s
            level["eps"][name] = now


def extract(model: nn.Module, level: int, example_inputs: torch.Tensor | None = None) -> nn.Module:
    """A standalone copy of ``model``'s level ``level``: its widths, its weights, its running statistics, and
    levels ``0..level`` of its own; exportable with :func:`~nas_split.surgery.export.save_grown` like any grown
    model (``model`` is not changed)."""
    record = _record(model)
    k = _index(record, level)
    with _full(model):
        _check_top(model, record)
        plan = _plan(model, record["levels"][k]["widths"], example_inputs, record)
        sub = copy.deepcopy(model)
    modules = dict(sub.named_modules())
    for name, dims in plan.keep.items():
        for dim, idx in dims.items():
            n = idx.numel()
            apply_edit(modules[name], dim, DimEdit(idx.tolist(), [1.0] * n, [1.0] * n))
    sub_record = getattr(sub, ATTR)
    sub_record["levels"] = sub_record["levels"][:k + 1]
    top = sub_record["levels"][-1]
    with torch.no_grad():
        for name, entry in top.pop("stats", {}).items():
            m = modules[name]
            for attr, t in entry.items():
                getattr(m, attr).copy_(t)
    top.pop("eps", None)
    refresh_feature_info(sub, _probe(sub, sub_record, example_inputs))
    return sub


def recalibrate(model: nn.Module, level: int, loader: Iterable, batches: int,
                example_inputs: torch.Tensor | None = None) -> None:
    """Recompute level ``level``'s running statistics from the first ``batches`` batches of ``loader`` (inputs,
    or ``(inputs, targets)``): reset, then the cumulative average over those batches (``momentum = None``), with
    only the norms in train mode and no gradients.  Under several processes each computes its own shard's."""
    norms = list(_norms(model).values())
    momenta = [m.momentum for m in norms]
    with set_level(model, level, example_inputs), evaluating(model), torch.no_grad():
        try:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            for batch in itertools.islice(loader, batches):
                x = batch[0] if isinstance(batch, list | tuple) else batch
                model(like_model(model, x))
        finally:
            for m, mom in zip(norms, momenta, strict=True):
                m.momentum = mom
