"""Per-layer-type channel edits, as gathers along one dimension.

An edit of a (module, dimension) is :class:`DimEdit`: new position ``k`` takes old position ``index[k]``,
multiplied by ``factor[k]`` (consumer columns of split copies: the copy weights ``w_i``), plus ``delta[k]``
(displaced rows of the split neuron), or replaced by ``fresh[k]`` (new neurons).  One handler per layer type
knows which tensors carry that dimension and what a new channel is initialised to (identity for norms and
depthwise filters, zero elsewhere unless given).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .graph import is_depthwise

__all__ = ["DimEdit", "ParamChange", "apply_edit", "resize"]


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


def _tensors(module: nn.Module, dim: str) -> list[tuple[str, int]]:
    """(attribute, axis) of every tensor of ``module`` indexed by channel along ``dim``."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return [(n, 0) for n in ("weight", "bias", "running_mean", "running_var") if getattr(module, n) is not None]
    if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
        if dim == "in":
            return [("weight", 1)]
        return [(n, 0) for n in ("weight", "bias") if getattr(module, n) is not None]
    raise TypeError(f"no channel handler for {type(module).__name__}")


def _default_fresh(module: nn.Module, attr: str, like: torch.Tensor) -> torch.Tensor:
    """New-channel value: identity for norms (γ=1, β=0, μ=0, σ²=1) and depthwise filters (centre tap 1), else 0."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return torch.ones_like(like) if attr in ("weight", "running_var") else torch.zeros_like(like)
    out = torch.zeros_like(like)
    if attr == "weight" and is_depthwise(module):
        centre = tuple(k // 2 for k in like.shape[1:])  # like: (1, *kernel)
        out[(0, *centre)] = 1.0
    return out


def apply_edit(module: nn.Module, dim: str, edit: DimEdit) -> list[ParamChange]:
    """Apply ``edit`` to every tensor of ``module`` along ``dim`` and update its size attributes."""
    changes = []
    for attr, axis in _tensors(module, dim):
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
                    value = _default_fresh(module, attr, target)
                target.copy_(value.to(target))
        if isinstance(old, nn.Parameter):
            p = nn.Parameter(new, requires_grad=old.requires_grad)
            setattr(module, attr, p)
            sf = torch.as_tensor(edit.state_factor, dtype=new.dtype, device=new.device)
            changes.append(ParamChange(old, p, axis, idx, sf))
        else:
            setattr(module, attr, new)
    _set_size(module, dim, len(edit.index))
    return changes


def _set_size(module: nn.Module, dim: str, n: int) -> None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = n
    elif isinstance(module, nn.Linear):
        if dim == "in":
            module.in_features = n
        else:
            module.out_features = n
    elif is_depthwise(module):
        module.in_channels = module.out_channels = module.groups = n
    elif dim == "in":
        module.in_channels = n
    else:
        module.out_channels = n


def resize(module: nn.Module, out: int | None = None, inp: int | None = None) -> None:
    """Give ``module`` new (uninitialised) tensors for ``out`` output and ``inp`` input channels.

    Used to rebuild a grown architecture before loading its ``state_dict``.
    """
    for dim, n in (("out", out), ("in", inp)):
        if n is None:
            continue
        for attr, axis in _tensors(module, dim):
            old = getattr(module, attr)
            shape = list(old.shape)
            shape[axis] = n
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad)
                    if isinstance(old, nn.Parameter) else new)
        _set_size(module, dim, n)
