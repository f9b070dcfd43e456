"""Carry optimizer state through surgery.

Each replaced parameter was built by a gather along one axis (:class:`~.handlers.ParamChange`); its state
tensors (SGD ``momentum_buffer``, Adam/AdamW ``exp_avg`` / ``exp_avg_sq``, RMSprop ``square_avg``, ...) are
gathered the same way, so entries of untouched channels are kept bit for bit and copies inherit their parent's
state.  The copies' entries are scaled as their gradients are: at ε = 0, the gradient of copy ``i``'s own
parameters (rows, norm and depthwise entries) is ``w_i`` times the parent's, and the gradient of a consumer
column is unchanged; first moments are multiplied by ``w_i`` and second moments by ``w_i²``, which is the state
the optimizer would hold had the network been split all along.  New channels start at zero.
"""
from __future__ import annotations

import torch

from .handlers import ParamChange

__all__ = ["carry_optimizer_state", "add_new_params", "SECOND_MOMENT_KEYS"]

#: State entries that accumulate squared gradients (scaled by the square of the factor).
SECOND_MOMENT_KEYS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta", "exp_inf"})


def _transform(t: torch.Tensor, ch: ParamChange, key: str) -> torch.Tensor:
    out = t.index_select(ch.axis, ch.index.to(t.device))
    f = ch.state_factor.to(out.device, out.dtype)
    if not torch.all(f == 1):
        shape = [1] * out.dim()
        shape[ch.axis] = -1
        out = out * (f * f if key in SECOND_MOMENT_KEYS else f).view(shape)
    return out


def carry_optimizer_state(optimizer: torch.optim.Optimizer, changes: list[ParamChange]) -> None:
    """Swap the replaced parameters in ``optimizer``'s groups and move their state (see module docstring)."""
    for ch in changes:
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p is ch.old:
                    group["params"][i] = ch.new
        state = optimizer.state.pop(ch.old, None)
        if state is None:
            continue
        optimizer.state[ch.new] = {
            k: (_transform(v, ch, k) if torch.is_tensor(v) and v.shape == ch.old.shape else v)
            for k, v in state.items()}


def add_new_params(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                   params: list[torch.nn.Parameter]) -> None:
    """Put the parameters of new modules of ``model`` (a block inserted by depth growth) in ``optimizer``, without
    state (they start as a fresh optimizer would start them).  Each joins the first group holding a parameter of
    its kind, as :func:`nas_split.training.make_optimizer` groups them: matrices and kernels (weight decay) apart
    from vectors (norms, biases; none); the first group when no group holds its kind.  Every group is then kept in
    ``model.parameters()`` order, the order ``make_optimizer`` gives, so that a saved state restores onto a
    rebuilt model (:func:`nas_split.checkpoints.restore_optimizer`)."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for p in params:
        if id(p) in held:
            continue
        group = next((g for g in optimizer.param_groups if any((q.dim() > 1) == (p.dim() > 1) for q in g["params"])),
                     optimizer.param_groups[0])
        group["params"].append(p)
        held.add(id(p))
    order = {id(p): i for i, p in enumerate(model.parameters())}
    for g in optimizer.param_groups:
        g["params"].sort(key=lambda p: order.get(id(p), len(order)))
