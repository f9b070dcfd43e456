"""Batch norm with the statistics of the whole batch across processes (``train.sync_batchnorm``).

Under several processes (:mod:`nas_split.distributed`) each holds the rows ``rank::world`` of every global batch,
and a plain batch norm in train mode normalises with the statistics of its own shard: a batch-norm model trained
on ``W`` processes of ``B`` samples does not train as one process with ``W·B`` would.  With
``train.sync_batchnorm`` every fit (:meth:`nas_split.training.Trainer.fit`) runs the model under
:func:`synchronized_batchnorm`, which swaps each batch norm for one that normalises with the statistics of the
whole batch, sharing its parameters, buffers and (timm's ``BatchNormAct2d``) its ``act`` and ``drop``:

* on CUDA (and XPU, HPU, a PrivateUse1 backend): ``torch.nn.SyncBatchNorm``, or timm's ``SyncBatchNormAct`` for a
  ``BatchNormAct2d`` (as ``timm.layers.convert_sync_batchnorm`` does);
* elsewhere (the CPU with gloo, whose tensors ``torch.nn.SyncBatchNorm`` refuses): :class:`AllReduceBatchNorm` /
  :class:`AllReduceBatchNormAct`, which compute the same statistics with one all-reduce per layer and step.

Per channel, over the ``N = Σ_r n_r`` values of every process (``n_r``: samples × positions of process ``r``)::

    mean = Σx / N          var = Σx² / N − mean²   (biased: the normalisation)
    y = γ (x − mean) / √(var + ε) + β
    running_mean ← (1 − m) running_mean + m mean
    running_var  ← (1 − m) running_var  + m var N / (N − 1)   (unbiased)

with ``m`` the momentum, or ``1 / num_batches_tracked`` with ``momentum=None`` (a cumulative average), exactly as
``nn.BatchNorm1d/2d/3d`` update them on one process.  Eval mode normalises with the running statistics, and alone
(no process group) the module is ``nn.BatchNorm``'s computation itself.

The swap lasts the fit only: outside it the model holds its own modules again, with the parameters and buffers
the fit left (the precision plugin may have replaced the buffers), so growth surgery, the analysis passes (which
run the model in eval mode: running statistics, the same in every process), checkpoints and
:func:`~nas_split.save_grown` all see plain batch norm, and a layer widened by a split is synchronised again by
the next fit.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .distributed import all_reduce_sum, world_size
from .errors import ConfigError
from .numerics import model_device

__all__ = ["AllReduceBatchNorm", "AllReduceBatchNormAct", "synchronized_batchnorm", "SYNCED_TYPES"]

#: Device types whose tensors ``torch.nn.SyncBatchNorm`` takes.
_TORCH_SYNC_DEVICES = ("cuda", "xpu", "hpu", torch._C._get_privateuse1_backend_name())


class _AllReduce(torch.autograd.Function):
    """``Σ_r t_r`` over the processes, with the gradient ``Σ_r ∂L_r/∂(Σ t)`` (every process's loss depends on the
    sum, so each one's share of the sum receives the gradients of all of them)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t.clone(memory_format=torch.contiguous_format))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(grad.clone(memory_format=torch.contiguous_format))


class AllReduceBatchNorm(_BatchNorm):
    """Batch norm over the whole batch of every process, on any device (see the module docstring for the
    formulas); built by :func:`synchronized_batchnorm` from an ``nn.BatchNorm1d/2d/3d``.

    In train mode each process sums, per channel, ``x − K`` and ``(x − K)²`` over its values and counts them,
    with ``K`` the running mean (a constant shared by the processes; zero without running statistics), and one
    all-reduce (in float64) adds the sums: ``mean = K + Σ(x − K) / N``, ``var = Σ(x − K)² / N − (mean − K)²``,
    the formulas above with the cancellation of ``Σx² / N − mean²`` reduced to that of the shift from the running
    mean.  The gradients flow through the all-reduce (its backward adds the processes' gradients), as through
    ``torch.nn.SyncBatchNorm``.  Inputs in half precision are normalised in float32.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        if not self.training or world_size() == 1:  # running statistics, or one process: nn.BatchNorm itself
            batch_stats = self.training or (self.running_mean is None and self.running_var is None)
            track = not self.training or self.track_running_stats
            return F.batch_norm(x, self.running_mean if track else None, self.running_var if track else None,
                                self.weight, self.bias, batch_stats, factor, self.eps)
        return self._synced(x, factor)

    def _synced(self, x: torch.Tensor, factor: float) -> torch.Tensor:
        c, dims = x.shape[1], [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        dtype = torch.promote_types(x.dtype, torch.float32)
        xs = x.to(dtype)
        shift = torch.zeros(c, dtype=dtype, device=x.device) if self.running_mean is None \
            else self.running_mean.detach().to(dtype)
        d = xs - shift.view(shape)
        n = torch.full((1,), float(x.numel() // c if c else 0), dtype=torch.float64, device=x.device)
        sums = _AllReduce.apply(torch.cat([d.sum(dims).double(), d.square().sum(dims).double(), n]))
        total = float(sums[-1].detach())
        if total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(total)} over the "
                             f"processes (input size {list(x.shape)} here)")
        offset = sums[:c] / total
        mean = (shift.double() + offset).to(dtype)
        var = (sums[c:2 * c] / total - offset.square()).clamp_min(0).to(dtype)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.running_mean.copy_(self.running_mean * (1 - factor) + mean.to(self.running_mean) * factor)
                unbiased = var.to(self.running_var) * (total / (total - 1))
                self.running_var.copy_(self.running_var * (1 - factor) + unbiased * factor)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(dtype)
        bias = -mean * scale
        if self.bias is not None:
            bias = bias + self.bias.to(dtype)
        return (xs * scale.view(shape) + bias.view(shape)).to(x.dtype)


class AllReduceBatchNormAct(AllReduceBatchNorm):
    """:class:`AllReduceBatchNorm` followed by the ``drop`` and ``act`` of the timm ``BatchNormAct2d`` it replaces
    (the same submodules)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _bn_act_types() -> tuple[type[nn.Module], type[nn.Module]]:
    """timm's ``BatchNormAct2d`` and its synchronised ``SyncBatchNormAct``."""
    from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct

    return BatchNormAct2d, SyncBatchNormAct


#: The batch-norm types a fit under ``train.sync_batchnorm`` swaps in (none is left outside the fit).
SYNCED_TYPES: tuple[type[nn.Module], ...] = (nn.SyncBatchNorm, AllReduceBatchNorm)


def _synced_type(m: _BatchNorm, torch_sync: bool) -> type[_BatchNorm]:
    bn_act, sync_act = _bn_act_types()
    if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return nn.SyncBatchNorm if torch_sync else AllReduceBatchNorm
    if type(m) is bn_act:
        return sync_act if torch_sync else AllReduceBatchNormAct
    raise ConfigError(f"train.sync_batchnorm cannot synchronise a {type(m).__name__} (a batch norm with a forward of "
                      "its own): only nn.BatchNorm1d/2d/3d and timm's BatchNormAct2d are converted")


def _move_state(src: nn.Module, dst: nn.Module) -> None:
    """Make ``dst`` hold ``src``'s parameters, buffers and submodules (the same tensors and modules)."""
    for k, p in src._parameters.items():
        dst.register_parameter(k, p)
    for k, b in src._buffers.items():
        dst.register_buffer(k, b, persistent=k not in src._non_persistent_buffers_set)
    for k, child in src.named_children():
        dst.add_module(k, child)
    dst.training = src.training


@contextmanager
def synchronized_batchnorm(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Inside: every batch norm of ``model`` (below its root) replaced by its synchronised counterpart (module
    docstring), holding the same parameters, buffers and submodules; on exit the original modules are back, with
    the parameters and buffers the synchronised ones hold then.  A no-op when not ``enabled`` or alone (no process
    group with more than one process).

    Convert after moving the model to its device: the type is chosen for the device it is on then.

    Raises:
        ConfigError: a batch norm of another type (a subclass with its own ``forward``), which a conversion would
            change the meaning of.
    """
    if not enabled or world_size() == 1:
        yield model
        return
    torch_sync = model_device(model).type in _TORCH_SYNC_DEVICES
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, _BatchNorm) and not isinstance(child, SYNCED_TYPES)]
    swaps = []
    for parent, name, m in found:
        cls = _synced_type(m, torch_sync)
        synced = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        _move_state(m, synced)
        swaps.append((parent, name, m, synced))
    for parent, name, _, synced in swaps:
        setattr(parent, name, synced)
    try:
        yield model
    finally:
        for parent, name, m, synced in swaps:
            _move_state(synced, m)
            setattr(parent, name, m)
