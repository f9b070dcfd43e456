"""Structured pruning to a MAC target with Torch-Pruning (NNI 3.0's ModelSpeedup is broken on current torch).

Criteria (``CRITERIA``): ``l1`` (filter magnitude), ``taylor`` (first-order, gradients of a few batches),
``slim`` (BatchNorm scale, network slimming: train with :func:`bn_l1_penalty` first), ``hessian`` (OBD,
per-sample gradients) and ``random``.  Pruning runs in small steps (Torch-Pruning's iterative scheduler) until
the model's MACs — counted by :func:`nas_split.cost.count_macs`, the convention of every nas-split record —
reach the target; a step that overshoots by more than the tolerance is undone and retried with finer steps.
Layers whose output channels are model outputs, or coupled in ways Torch-Pruning cannot see (PointNet's
feature-transform ``bmm``), are left alone: the prunable layers are exactly the growable ones.

Two ways to share the cut among the layers:

* uniform (default): every prunable layer loses the same fraction of its channels, ranked within the layer;
  the criterion picks *which* channels go, the widths keep the original proportions.
* global (``global_pruning=True``, Torch-Pruning's ``global_pruning=True``): every step ranks the channels of
  all prunable layers together and removes the least important ones wherever they are, so the criterion also
  chooses the widths.  Scores are compared across layers after Torch-Pruning's default normalisation, kept
  as it is (``normalizer="mean"``: each layer's scores divided by their mean, so a layer's overall scale does
  not matter, the spread of its scores does; at initialisation the layers with the fewest inputs per channel
  spread most and go first).  Every layer keeps at least ``1 - MAX_GLOBAL_RATIO`` (10 %) of the channels it
  had when :func:`prune_to_macs` was called, rounded up: Torch-Pruning's ``max_pruning_ratio`` (passed, 0.9)
  only drops a layer from the ranking once below that share of its width *when the schedule started* and
  *before* a step (without more, layers fell to 1 channel of 32 or 64), so each step is also trimmed to the
  floor.  Equal scores are ordered by the fraction of its width each layer would have lost (a relative nudge
  below float32's resolution): Torch-Pruning's global threshold prunes every channel at or under it and skips
  a step that would empty a layer, so equal scores (BatchNorm scales at their initial 1) left a model unpruned;
  ordered, layers of equal scores are cut alike.
"""
from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from nas_split.cost import count_macs
from nas_split.distributed import all_reduce_sum, batch_share, rank, summed, world_size
from nas_split.numerics import evaluating, like_model
from nas_split.surgery import growable_layers
from nas_split.surgery.handlers import is_depthwise
from nas_split.surgery.sizes import apply_sizes, layer_sizes

__all__ = ["CRITERIA", "MAX_GLOBAL_RATIO", "PruneReport", "prune_to_macs", "bn_l1_penalty", "importance"]

CRITERIA = ("l1", "taylor", "slim", "hessian", "random")
MAX_GLOBAL_RATIO = 0.9  # global pruning removes at most this share of a layer's channels


def importance(criterion: str) -> tp.importance.Importance:
    """The Torch-Pruning importance of a criterion name."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown pruning criterion {criterion!r}; known: {', '.join(CRITERIA)}")
    return {"l1": lambda: tp.importance.MagnitudeImportance(p=1),
            "taylor": tp.importance.TaylorImportance,
            "slim": tp.importance.BNScaleImportance,
            "hessian": tp.importance.HessianImportance,
            "random": tp.importance.RandomImportance}[criterion]()


class _TieBroken(tp.importance.Importance):
    """``imp``'s scores in float64, times ``1 + 2**-30 * (n0 - n + i + 1/2) / n0`` for channel ``i`` of a group
    now ``n`` wide and ``n0`` wide when first scored: equal scores go in the order of the fraction of its width
    the group would have lost, so groups of equal scores lose the same fraction; distinct float32 scores keep
    their order (the nudge is below float32's resolution)."""

    def __init__(self, imp: tp.importance.Importance):
        self.imp, self.widths = imp, {}

    def __call__(self, group, **kwargs):
        s = self.imp(group, **kwargs)
        if s is None:
            return None
        n0 = self.widths.setdefault(group[0].dep.target.module, len(s))
        pos = (torch.arange(len(s), device=s.device, dtype=torch.float64) + n0 - len(s) + 0.5) / n0
        return s.double() * (1 + 2.0 ** -30 * pos)


def _global_step(pruner: tp.pruner.BasePruner, floors: dict[nn.Module, int]) -> None:
    """One step of ``pruner``, each group cut to the channels that keep every layer whose output channels it
    prunes at its ``floors`` or above (the least important of those Torch-Pruning chose; a group that cannot be
    cut so is skipped)."""
    for group in pruner.step(interactive=True):
        dep, idxs = group[0]
        root = dep.target.module  # may be a depthwise conv: it roots the group of the layer before it
        width = pruner.DG.get_out_channels(root)
        room = width - max((floors.get(d.target.module, 1) for d, _ in group
                            if pruner.DG.is_out_channel_pruning_fn(d.handler)), default=1)
        if len(idxs) <= room:
            group.prune()
            continue
        scores = pruner.estimate_importance(pruner.DG.get_pruning_group(root, dep.handler, list(range(width))))
        if room > 0 and scores is not None and len(scores) == width:  # not for grouped channels
            plain = [getattr(i, "idx", i) for i in idxs]  # ints, or Torch-Pruning's (idx, root_idx) pairs
            group.prune(idxs=sorted(plain, key=lambda i: scores[i].item())[:room])


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
    keeps only the last sample (its membership test compares a name with parameter keys; ``tests/test_baselines.py``
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
                  tolerance: float = 0.03, steps: int = 100, grad_batches: int = 2,
                  global_pruning: bool = False) -> PruneReport:
    """Prune ``model`` in place until its MACs are within ``tolerance`` of ``target_macs`` (or just below).

    Args:
        target_macs: MACs per sample to reach (must be below the current MACs).
        loader: batches for the gradient-based criteria (``taylor``, ``hessian``).
        round_to: keep every pruned width a multiple of this (coarser steps; the tolerance may then be missed).
        steps: steps to remove 90 % of the prunable channels (of every layer, or of all together with
            ``global_pruning``); finer retries double it.
        global_pruning: rank channels across layers (widths chosen by the criterion, each layer kept at 10 % or
            more of its width) instead of pruning every layer by the same fraction; see the module docstring.
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
    sizes, unit = layer_sizes(model), round_to or 1  # global pruning's floors: 10 %, up to a multiple of round_to
    floors = {m: min(sizes[n][0], unit * math.ceil((1 - MAX_GLOBAL_RATIO) * sizes[n][0] / unit))
              for n, m in model.named_modules() if n in prunable}
    ranked = _TieBroken(imp) if global_pruning else imp
    macs, taken = before, 0
    try:
        with evaluating(model):
            while macs > target_macs * (1 + tolerance) and steps <= 6400:
                pruner = tp.pruner.BasePruner(model, example_inputs, importance=ranked, pruning_ratio=0.9,
                                              iterative_steps=steps, ignored_layers=ignored, round_to=round_to,
                                              global_pruning=global_pruning,
                                              max_pruning_ratio=MAX_GLOBAL_RATIO if global_pruning else 1.0)
                for _ in range(steps):
                    snapshot = copy.deepcopy(model.state_dict()), layer_sizes(model)
                    _gradients(model, criterion, imp, batches, loss_fn)
                    if global_pruning:
                        _global_step(pruner, floors)
                    else:
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
        model.zero_grad(set_to_none=True)
    return PruneReport(before, macs, target_macs, taken)
