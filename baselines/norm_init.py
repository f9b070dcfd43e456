"""Batch norm of new neurons, initialised to be the identity on the data (train mode as well as eval mode).

A new channel enters its batch norm with the identity entries (``γ = 1, β = 0, μ = 0, σ² = 1``): the identity in
eval mode only.  In train mode the norm divides by the channel's own batch statistics, so a new channel whose
pre-activations ``z`` are small (GradMax: zero fan-in; Firefly: a fan-in scored at its small scale) is rescaled to
unit variance as soon as its fan-in moves, and its output jumps from ``≈ z`` to ``O(1)``.  At zero variance the
gradient through the norm is amplified by ``γ / √ε`` (≈ 316 for ``ε = 1e-5``), which is how GradMax's first step
throws the new channels far out.

:func:`calibrate_new_norms` sets the new entries from the statistics of one batch (``μ_b``, biased ``σ_b²``, as the
norm computes them in train mode):  ``running_mean = μ_b``, ``running_var = σ_b²``, ``β = μ_b``,
``γ = √(σ_b² + ε)``.  Then ``γ (z − μ) / √(σ² + ε) + β = z`` on that batch in both modes: the new channel starts
as the function its method chose, and its fan-in gradient is the one that method computed (the norm is
``∂out/∂z = 1`` there, not ``γ / √ε``).  For a zero fan-in (``σ_b = 0``) this gives ``γ = √ε``: while the fan-in
is small (``σ² ≪ ε``) the channel passes ``z − μ`` unchanged, and once it grows its output saturates at
``√ε · ẑ`` until ``γ`` itself learns: growth without a jump.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from nas_split.distributed import all_reduce_sum, world_size
from nas_split.numerics import evaluating, full_precision, like_model
from nas_split.surgery import CouplingGraph

__all__ = ["calibrate_new_norms"]


@full_precision()
def calibrate_new_norms(model: nn.Module, example_inputs: torch.Tensor, new: Mapping[str, int],
                        loader: Iterable) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Make every batch-norm entry of the last ``new[layer]`` channels of each layer the identity on the first batch
    of ``loader`` (see the module docstring): the layer's own norm and the norms its channels pass through before
    their consumer (after a depthwise conv, MobileNet); returns ``{norm: (μ_b, σ_b²)}`` of the new entries.

    Under several processes the statistics are those of the whole batch (the processes' shards together).
    The model is run once in eval mode (running statistics untouched, new entries still the eval-mode identity)
    without gradients; every norm's input is read from that pass.
    """
    graph = CouplingGraph(model, example_inputs)
    entries: dict[str, list[int]] = {}
    for layer, k in new.items():
        group = graph.group(layer)
        for slot in group.slots:
            if slot.role == "norm" and isinstance(slot.module, nn.modules.batchnorm._BatchNorm):
                idx = [p for c in range(group.width - k, group.width) for p in slot.positions[c]]
                entries.setdefault(slot.name, []).extend(idx)
    if not entries:
        return {}
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    hooks = [modules[n].register_forward_hook(lambda _m, i, _o, n=n: captured.__setitem__(n, i[0].detach()))
             for n in entries]
    x = like_model(model, next(iter(loader))[0])
    try:
        with evaluating(model), torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    with torch.no_grad():
        for n, idx in entries.items():
            bn, i = modules[n], torch.as_tensor(idx, device=captured[n].device)
            z = captured[n].transpose(0, 1).reshape(captured[n].shape[1], -1)[i]  # (k, samples x positions)
            # first and second moments summed over the processes' shards of the batch (the identity alone)
            sums = all_reduce_sum(torch.stack([z.sum(1), z.pow(2).sum(1), torch.full_like(z[:, 0], z.shape[1])]))
            mean = sums[0] / sums[2]
            var = (sums[1] / sums[2] - mean * mean).clamp_min(0) if world_size() > 1 else z.var(1, unbiased=False)
            bn.running_mean[i] = mean
            bn.running_var[i] = var
            if bn.affine:
                bn.weight[i] = (var + bn.eps).sqrt()
                bn.bias[i] = mean
            out[n] = (mean, var)
    return out
