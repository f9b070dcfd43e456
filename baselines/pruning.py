"""Structured pruning to a MAC target with Torch-Pruning (NNI 3.0's ModelSpeedup is broken on current torch).

Criteria (``CRITERIA``): ``l1`` (filter magnitude), ``taylor`` (first-order, gradients of a few batches),
``slim`` (BatchNorm scale, network slimming: train with :func:`bn_l1_penalty` first), ``hessian`` (OBD,
per-sample gradients) and ``random``.  Pruning runs in small uniform steps (Torch-Pruning's iterative
scheduler) until the model's MACs — counted by :func:`nas_split.cost.count_macs`, the convention of every
nas-split record — reach the target; a step that overshoots by more than the tolerance is undone and retried
with finer steps.  Layers whose output channels are model outputs, or coupled in ways Torch-Pruning cannot see
(PointNet's feature-transform ``bmm``), are left alone: the prunable layers are exactly the growable ones.
"""
from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from nas_split.cost import count_macs
from nas_split.distributed import all_reduce_sum, batch_share, rank, summed, world_size
from nas_split.numerics import like_model
from nas_split.surgery import growable_layers
from nas_split.surgery.handlers import is_depthwise
from nas_split.surgery.sizes import apply_sizes, layer_sizes

__all__ = ["CRITERIA", "PruneReport", "prune_to_macs", "bn_l1_penalty", "importance"]

CRITERIA = ("l1", "taylor", "slim", "hessian", "random")


def importance(criterion: str) -> tp.importance.Importance:
    """The Torch-Pruning importance of a criterion name."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown pruning criterion {criterion!r}; known: {', '.join(CRITERIA)}")
    return {"l1": lambda: tp.importance.MagnitudeImportance(p=1),
            "taylor": tp.importance.TaylorImportance,
            "slim": tp.importance.BNScaleImportance,
            "hessian": tp.importance.HessianImportance,
            "random": tp.importance.RandomImportance}[criterion]()


def bn_l1_penalty(model: nn.Module, coef: float = 1e-4) -> torch.Tensor:
    """Network slimming's sparsity term ``coef * Σ |γ|`` over batch norms, to add to the training loss."""
    gammas = [m.weight.abs().sum() for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    return coef * torch.stack(gammas).sum() if gammas else torch.zeros(())


@dataclass
class PruneReport:
    """MACs before and after, the steps taken and the relative miss of the target."""

    macs_before: int
    macs_after: int
    target: float
    steps: int

    @property
    def error(self) -> float:
        """(after - target) / target."""
        return (self.macs_after - self.target) / self.target


def _gradients(model: nn.Module, criterion: str, imp, batches: list, loss_fn: Callable) -> None:
    """Fill what ``imp`` reads: ``.grad`` = Σ over batches of the batch-mean gradient (Taylor), or the mean squared
    per-sample gradient of the first 8 samples of every batch (Hessian / OBD).

    Under several processes each holds its rows ``rank::world`` of every batch; the sums are added over the
    processes, so each holds what one process would compute on the whole batches.  For OBD the squares are
    accumulated here rather than by Torch-Pruning's ``HessianImportance.accumulate_grad``, whose accumulator
    keeps only the last sample (its membership test compares a name with parameter keys; ``tests/test_baselines``
    shows it), and handed to the importance through the ``_accu_grad`` / ``_counter`` it reads."""
    world, r = world_size(), rank()
    params = [p for p in model.parameters() if p.requires_grad]
    if criterion == "taylor":
        model.zero_grad()
        for x, y in batches:
            (loss_fn(model(x), y) * batch_share(len(y), y.device)).backward()
        for p in params:
            if p.grad is not None:
                all_reduce_sum(p.grad)
    elif criterion == "hessian":
        imp.zero_grad()
        squares = [torch.zeros_like(p) for p in params]
        count = 0
        for x, y in batches:
            # global samples 0..7 of the batch: local row i of process r is global row i * world + r
            for i in range(min(len(y), (8 - r + world - 1) // world)):
                model.zero_grad()
                loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
                for sq, p in zip(squares, params, strict=True):
                    if p.grad is not None:
                        sq += p.grad.detach() ** 2
                count += 1
        n = summed(count)
        for sq, p in zip(squares, params, strict=True):
            imp._accu_grad[p] = all_reduce_sum(sq)
            imp._counter[p] = max(n, 1)


def prune_to_macs(model: nn.Module, example_inputs: torch.Tensor, target_macs: float, criterion: str = "l1",
                  loader: Iterable | None = None, loss_fn: Callable = F.cross_entropy, round_to: int | None = None,
                  tolerance: float = 0.03, steps: int = 100, grad_batches: int = 2) -> PruneReport:
    """Prune ``model`` in place until its MACs are within ``tolerance`` of ``target_macs`` (or just below).

    Args:
        target_macs: MACs per sample to reach (must be below the current MACs).
        loader: batches for the gradient-based criteria (``taylor``, ``hessian``).
        round_to: keep every pruned width a multiple of this (coarser steps; the tolerance may then be missed).
        steps: uniform steps to remove 90 % of every prunable layer's channels; finer retries double it.
    """
    imp = importance(criterion)
    before, _ = count_macs(model, example_inputs)
    if not 0 < target_macs < before:
        raise ValueError(f"pruning target {target_macs / 1e6:.3f} MMACs must be below the model's "
                         f"{before / 1e6:.3f} MMACs and positive")
    if criterion in ("taylor", "hessian") and loader is None:
        raise ValueError(f"criterion {criterion!r} needs a loader for its gradients")
    batches = [(like_model(model, x), like_model(model, y)) for x, y in itertools.islice(loader or [], grad_batches)]
    example_inputs = like_model(model, example_inputs)
    prunable = set(growable_layers(model, example_inputs))
    ignored = [m for n, m in model.named_modules()  # depthwise convs follow their group; never list them
               if isinstance(m, nn.modules.conv._ConvNd | nn.Linear) and not is_depthwise(m) and n not in prunable]
    was = model.training
    model.eval()
    macs, taken = before, 0
    try:
        while macs > target_macs * (1 + tolerance) and steps <= 6400:
            pruner = tp.pruner.BasePruner(model, example_inputs, importance=imp, pruning_ratio=0.9,
                                          iterative_steps=steps, ignored_layers=ignored, round_to=round_to)
            for _ in range(steps):
                snapshot = copy.deepcopy(model.state_dict()), layer_sizes(model)
                _gradients(model, criterion, imp, batches, loss_fn)
                pruner.step()
                taken += 1
                new, _ = count_macs(model, example_inputs)
                if new < target_macs * (1 - tolerance) and round_to is None:
                    apply_sizes(model, snapshot[1])  # overshot: undo, continue with finer steps
                    model.load_state_dict(snapshot[0])
                    break
                macs = new
                if macs <= target_macs * (1 + tolerance):
                    break
            else:
                break  # the schedule is exhausted
            steps *= 2
    finally:
        model.train(was)
        model.zero_grad(set_to_none=True)
    return PruneReport(before, macs, target_macs, taken)
