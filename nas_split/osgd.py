"""Orthogonalized SGD (Wan, Hoffmann, Lu & Maire, "Orthogonalized SGD and Nested Architectures for Anytime
Neural Networks", ICML 2020) for the levels of an anytime network (:mod:`nas_split.anytime`).

With the outputs ordered by priority, smallest level first, and ``g_k = ∇_θ L_k`` the gradient of level ``k``'s
loss, the paper's update is Gram–Schmidt in that order,

    g̃_1 = g_1,      g̃_k = g_k − Σ_{j<k} (⟨g_k, g̃_j⟩ / ‖g̃_j‖²) g̃_j,

and the step follows ``Σ_k g̃_k``: a later level moves the parameters only along directions orthogonal to the
earlier levels' gradients (``⟨g_j, g̃_k⟩ = 0`` for ``j < k``, as ``g_j`` lies in ``span(g̃_1..g̃_j)``), so to first
order it does not change their losses, while the earliest level gets its own gradient unchanged.

Choices the paper leaves open (the sources nas-split has do not settle them), made here:

* **Unit** (``unit``): ``"tensor"`` (default) orthogonalises each parameter tensor on its own, ``"vector"`` the
  whole parameter vector (inner products summed over the tensors).  Per tensor, the components are orthogonal in
  every tensor and hence also as whole vectors; the non-interference survives any per-tensor scaling of the step
  (learning rates per parameter group, per-layer rates), which whole-vector orthogonality does not.
* **Norms**: Gram–Schmidt is the modified form (each projection is taken from the running remainder, equal in
  exact arithmetic and more accurate in floating point), inner products summed in float64.  A component whose
  norm is at most ``rtol`` times its level's gradient norm (the gradient lies in the earlier ones' span up to
  rounding, or is zero) is set to zero and not projected on: it carries no direction of its own.
* **Momentum and the optimizer**: only the current mini-batch's gradients are orthogonalised; ``.grad`` is set to
  ``Σ_k g̃_k`` and any torch optimizer steps as usual, so momentum (SGD) or Adam's moments accumulate the
  orthogonalised sums, and weight decay is the optimizer's, not projected.
* **Ablations** (``mode``): ``"sum"`` steps on ``∇ Σ_k L_k`` (plain multi-output training), ``"last"`` on the
  largest level's ``g_K`` alone (ordinary training of the full model).

**Several processes (DDP)**: the projection must use the whole batch's gradients, not a shard's.  Each level's
gradient is computed with ``torch.autograd.grad`` (no ``.grad`` accumulation, so DDP's reducer does not fire) and
all-reduced here, weighted by this process's share of the batch, before the projection; every process then holds
the same ``Σ_k g̃_k``.  Run the level forwards on the module itself (``ddp_model.module``) or inside
``ddp_model.no_sync()``, so DDP does not expect a backward of its own.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch

from .distributed import all_reduce_sum, world_size

__all__ = ["Mode", "Unit", "MODES", "level_gradients", "orthogonalize", "osgd_backward"]

Mode = Literal["osgd", "sum", "last"]
Unit = Literal["tensor", "vector"]
MODES: tuple[str, ...] = ("osgd", "sum", "last")


def _reduced(grads: list[torch.Tensor], share: float | None) -> list[torch.Tensor]:
    """The whole batch's gradients: this process's times its ``share`` (default ``1 / world``, DDP's average),
    summed over the processes (one all-reduce per dtype and device); the identity alone."""
    if world_size() == 1:
        return grads
    weight = 1.0 / world_size() if share is None else share
    out = list(grads)
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, g in enumerate(grads):
        buckets.setdefault((g.dtype, g.device), []).append(i)
    for idx in buckets.values():
        flat = all_reduce_sum(torch.cat([grads[i].reshape(-1) for i in idx]) * weight)
        for i, part in zip(idx, flat.split([grads[i].numel() for i in idx]), strict=True):
            out[i] = part.view_as(grads[i])
    return out


def level_gradients(losses: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                    share: float | None = None) -> tuple[list[list[torch.Tensor]], list[bool]]:
    """``g_k`` of every loss w.r.t. ``params`` (zeros where a loss does not reach a parameter), all-reduced across
    processes (see the module docstring; ``share``: this process's fraction of the batch, e.g.
    :func:`~nas_split.distributed.batch_share`), and which parameters any loss reaches."""
    used = [False] * len(params)
    grads = []
    for k, loss in enumerate(losses):
        gs = torch.autograd.grad(loss, params, retain_graph=k < len(losses) - 1, allow_unused=True)
        used = [u or g is not None for u, g in zip(used, gs, strict=True)]
        grads.append(_reduced([torch.zeros_like(p) if g is None else g for g, p in zip(gs, params, strict=True)],
                              share))
    return grads, used


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum(dtype=torch.float64) for x, y in zip(a, b, strict=True))


def _gram_schmidt(vectors: list[list[torch.Tensor]], rtol: float) -> list[list[torch.Tensor]]:
    """Modified Gram–Schmidt of ``vectors`` (each a list of tensors forming one vector), in order."""
    basis: list[tuple[list[torch.Tensor], torch.Tensor]] = []
    out = []
    for g in vectors:
        r = [t.clone() for t in g]
        for q, q2 in basis:
            c = (_dot(r, q) / q2).neg()
            for t, u in zip(r, q, strict=True):
                t.addcmul_(u, c.to(t.dtype))
        r2 = _dot(r, r)
        keep = r2 > rtol * rtol * _dot(g, g)
        r = [torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device)) for t in r]
        basis.append((r, torch.where(keep, r2, torch.ones_like(r2))))  # a zero component projects nothing away
        out.append(r)
    return out


def orthogonalize(grads: Sequence[Sequence[torch.Tensor]], unit: Unit = "tensor",
                  rtol: float = 1e-6) -> list[list[torch.Tensor]]:
    """The components ``g̃_k`` of the levels' gradients ``grads[k][i]`` (level ``k``, parameter ``i``), smallest
    level first, orthogonalised per parameter tensor or as whole vectors (see the module docstring)."""
    if unit not in ("tensor", "vector"):
        raise ValueError(f"unit must be 'tensor' or 'vector', got {unit!r}")
    grads = [list(g) for g in grads]
    if unit == "vector":
        return _gram_schmidt(grads, rtol)
    per_tensor = [_gram_schmidt([[g[i]] for g in grads], rtol) for i in range(len(grads[0]) if grads else 0)]
    return [[per_tensor[i][k][0] for i in range(len(per_tensor))] for k in range(len(grads))]


def osgd_backward(losses: Sequence[torch.Tensor], params: Iterable[torch.Tensor], mode: Mode = "osgd",
                  unit: Unit = "tensor", share: float | None = None, rtol: float = 1e-6) -> list[list[torch.Tensor]]:
    """Set ``.grad`` of ``params`` for one step on the levels' ``losses`` (smallest level first); returns the
    components whose sum ``.grad`` now is (``mode="osgd"``: the ``g̃_k``; ``"sum"``: ``[∇ Σ L_k]``; ``"last"``:
    ``[g_K]``).  Then call the optimizer's ``step()``.

    ``.grad`` is replaced, not accumulated; a parameter that no loss reaches keeps its ``.grad``.  With one level
    every mode is ``loss.backward()``'s gradient, bit for bit.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not losses:
        raise ValueError("osgd_backward needs at least one loss")
    params = [p for p in params if p.requires_grad]
    if mode == "sum":
        losses = [losses[0] if len(losses) == 1 else torch.stack(list(losses)).sum()]
    elif mode == "last":
        losses = [losses[-1]]
    grads, used = level_gradients(losses, params, share)
    parts = orthogonalize(grads, unit, rtol) if mode == "osgd" else grads
    for i, p in enumerate(params):
        if used[i]:
            total = parts[0][i]
            for comp in parts[1:]:
                total = total + comp[i]
            p.grad = total
    return parts
