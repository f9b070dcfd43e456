"""The growability check: which layers' output channels can be split, verified by a trial split.

Sits above :mod:`.split` (it runs one) and below :mod:`.export`: graph < handlers < optim < sizes < split <
growable < export.
"""
from __future__ import annotations

import copy
from collections.abc import Collection

import torch
from torch import nn

from ..numerics import full_precision, like_model
from .graph import ChannelGroup, CouplingGraph, NotGrowableError
from .split import SplitScheme, split_groups

__all__ = ["growable_layers"]


@full_precision()
def growable_layers(model: nn.Module, example_inputs: torch.Tensor, verify: bool = True,
                    graph: CouplingGraph | None = None, trusted: Collection[str] = ()) -> list[str]:
    """Names (as in ``model.named_modules()``) of the layers whose output channels can be split.

    A layer qualifies when it is a dense conv or linear layer whose coupling group holds only layers nas-split
    can edit.  With ``verify`` (default), each one is also split once on a copy of the model (channel 0, ε = 0)
    and must keep the outputs equal (relative error ≤ 1e-4, a tolerance for IEEE fp32: the check runs in
    :func:`~nas_split.numerics.full_precision` whatever TF32 or autocast say, on the model's device), which
    catches couplings the tracer cannot see (e.g. channels reshaped into a matrix for ``torch.bmm``, as in
    PointNet's feature transform).  Layers in ``trusted`` (verified before; widening a layer does not change
    how its channels are coupled) skip the trial split.
    """
    graph = graph or CouplingGraph(model, example_inputs)
    names = []
    for n in graph.candidates():
        try:
            group = graph.group(n)
        except NotGrowableError:
            continue
        if verify and n not in trusted and not _preserves(model, example_inputs, group):
            continue
        names.append(n)
    return names


def _preserves(model: nn.Module, x: torch.Tensor, group: ChannelGroup) -> bool:
    trial = copy.deepcopy(model).eval()
    x = like_model(model, x)
    with torch.no_grad():
        ref = trial(x)
        try:
            split_groups(trial, x, {group.root: group.rebind(trial)}, {group.root: [(0, SplitScheme.s2d())]}, 0.0)
            out = trial(x)
        except (RuntimeError, ValueError):
            return False
    if out.shape != ref.shape:
        return False
    return bool(((out - ref).norm() <= 1e-4 * ref.norm().clamp_min(1e-12)).item())
