"""The growability check: which layers' output channels can be split, verified by a trial split.

Sits above :mod:`.split` (it runs one) and below :mod:`.export`: graph < handlers < optim < sizes < split <
growable < export.
"""
from __future__ import annotations

import copy
from collections.abc import Collection, MutableMapping
from weakref import WeakKeyDictionary

import torch
from torch import nn

from ..numerics import full_precision, like_model
from .graph import ChannelGroup, CouplingGraph, NotGrowableError, output_tensors
from .split import SplitScheme, split_groups

__all__ = ["growable_layers"]

_TOLERANCE = 1e-4
#: Trial-split verdicts of each model object at its latest structure (its ``repr``: every module's class and sizes,
#: and the input shape): ``(structure, {layer: None (kept the function) | why not})``, so that checking one model
#: again (validation before a run, each growth method's check, the first round) costs no trial split until the
#: model changes.  A trial split that raised (which may be transient: out of memory) is not remembered.
_VERDICTS: WeakKeyDictionary[nn.Module, tuple[tuple, dict[str, str | None]]] = WeakKeyDictionary()


@full_precision()
def growable_layers(model: nn.Module, example_inputs: torch.Tensor, verify: bool = True,
                    graph: CouplingGraph | None = None, trusted: Collection[str] = (),
                    reasons: MutableMapping[str, str] | None = None) -> list[str]:
    """Names (as in ``model.named_modules()``) of the layers whose output channels can be split.

    A layer qualifies when it is a dense conv or linear layer whose coupling group holds only layers nas-split
    can edit.  With ``verify`` (default), each one is also split once on a copy of the model (channel 0, ε = 0)
    and must keep the outputs equal (relative error ≤ 1e-4, a tolerance for IEEE fp32: the check runs in
    :func:`~nas_split.numerics.full_precision` whatever TF32 or autocast say, on the model's device), which
    catches couplings the tracer cannot see (e.g. channels reshaped into a matrix for ``torch.bmm``, as in
    PointNet's feature transform, or averaged over, as by a ``mean`` over channels).  Layers in ``trusted``
    (verified before; widening a layer does not change how its channels are coupled) skip the trial split, and a
    model checked before with the same structure (its ``repr`` and the input shape) reuses its verdicts.  The check
    holds two copies of the model at a time (the eval-mode reference and one trial), on the model's device.

    Every other conv and linear layer of the traced graph is left out, and its reason (the message of the
    :class:`NotGrowableError` it raises, naming the layer) is stored in ``reasons`` when one is given.  The only
    error raised is a :class:`NotGrowableError` when the tracer cannot trace the model at all (an error of the
    model itself on ``example_inputs`` propagates unchanged).
    """
    graph = graph or CouplingGraph(model, example_inputs)
    key = (repr(model), tuple(example_inputs.shape[1:]), example_inputs.dtype)
    if model not in _VERDICTS or _VERDICTS[model][0] != key:
        _VERDICTS[model] = (key, {})
    verdicts = _VERDICTS[model][1]
    reference = None  # the eval-mode copy every trial split starts from, and its outputs: built once, when needed
    names = []
    for n in graph.candidates():
        try:
            group = graph.group(n)
            if verify and n not in trusted:
                if n not in verdicts:
                    try:
                        reference = reference or _reference(model, example_inputs)
                        _preserves(*reference, example_inputs, group)
                        verdicts[n] = None
                    except NotGrowableError as e:
                        if e.__cause__ is None:  # the outputs changed: a verdict on the structure
                            verdicts[n] = str(e)
                        raise
                if verdicts[n] is not None:
                    raise NotGrowableError(verdicts[n])
        except NotGrowableError as e:
            if reasons is not None:
                reasons[n] = str(e)
            continue
        names.append(n)
    return names


def _reference(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, list[torch.Tensor]]:
    """An eval-mode copy of ``model`` and its outputs on ``x``: what every trial split starts from and must keep
    (computed once per check; an error of the model itself propagates)."""
    base = copy.deepcopy(model).eval()
    with torch.no_grad():
        return base, output_tensors(base(like_model(model, x)))


def _preserves(base: nn.Module, ref: list[torch.Tensor], x: torch.Tensor, group: ChannelGroup) -> None:
    """Check that splitting channel 0 of ``group.root`` (ε = 0) on a copy of ``base`` (:func:`_reference`) keeps
    its outputs ``ref`` on ``x``; raises :class:`NotGrowableError` saying how it does not (any failure of the trial
    split counts: it runs the user's model at a width it was not built for)."""
    trial = copy.deepcopy(base)
    x = like_model(base, x)
    with torch.no_grad():
        try:
            split_groups(trial, x, {group.root: group.rebind(trial)}, {group.root: [(0, SplitScheme.s2d())]}, 0.0)
            out = trial(x)
        except Exception as e:  # noqa: BLE001 - whatever the widened model raises, the split does not work
            raise NotGrowableError(f"layer {group.root!r} is not growable: a trial split of it fails "
                                   f"({type(e).__name__}: {e})") from e
    out = output_tensors(out)
    if [t.shape for t in out] != [t.shape for t in ref]:
        raise NotGrowableError(f"layer {group.root!r} is not growable: a trial split of it changes the output shapes "
                               f"from {[tuple(t.shape) for t in ref]} to {[tuple(t.shape) for t in out]}")
    ref, out = torch.cat([t.flatten() for t in ref]), torch.cat([t.flatten() for t in out])
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    if not err <= _TOLERANCE:  # also when NaN
        raise NotGrowableError(f"layer {group.root!r} is not growable: a trial split of it (ε = 0) changes the "
                               f"outputs by a relative {err:.2g} (> {_TOLERANCE:g}): its channels are coupled in a "
                               "way the coupling graph does not see")
