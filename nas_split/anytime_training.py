"""Training an anytime network's levels together: one step forwards every trained level and combines the levels'
gradients with orthogonalized SGD (Wan, Hoffmann, Lu & Maire, ICML 2020; :mod:`nas_split.osgd`), their plain sum,
or the largest level's alone (ordinary training, the ablation baseline).

:class:`AnytimeConfig` is what ``growth.anytime`` (``grow``, ``nni``) and ``method_options.anytime`` (``run``,
``compare``) hold; :class:`LevelStep` is the step :meth:`nas_split.training.Trainer.fit` takes instead of its own
``loss.backward()``.  The levels are those :func:`nas_split.anytime.add_level` recorded (level ``k``: the widths
after stage ``k``); ``levels: all`` trains every level so far, ``levels: K`` the last ``K`` (the full model
always among them).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .anytime import ATTR, add_level, extract, levels, recalibrate, set_level
from .config import AnytimeConfig
from .cost import CostModel, CostReport, measure_cost
from .osgd import osgd_backward
from .surgery.sizes import layer_widths
from .training import EvalResult

__all__ = ["AnytimeConfig", "trained_levels", "LevelStep", "track_levels", "level_rows", "recalibrate_levels"]


def trained_levels(model: nn.Module, cfg: AnytimeConfig) -> list[int]:
    """Indices of the levels a step trains, smallest first (the last one is the full model; ``optimizer: last``
    trains it alone)."""
    n = len(levels(model))
    first = n - 1 if cfg.optimizer == "last" else 0 if cfg.levels == "all" else max(0, n - cfg.levels)
    return list(range(first, n))


class LevelStep:
    """One training step over the trained levels of ``model`` (see the module docstring).

    Called by the trainer with the model, its (possibly Fabric-wrapped) module, a batch and the criterion; it sets the
    parameters' ``.grad`` (replacing them) and returns the full model's loss and outputs for the epoch's
    statistics.  Under several processes the levels' forwards run without DDP's own gradient sync and
    :func:`~nas_split.osgd.osgd_backward` all-reduces each level's gradient before combining them.
    """

    def __init__(self, cfg: AnytimeConfig):
        self.cfg = cfg

    def __call__(self, model: nn.Module, fmodel: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 crit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 no_sync: Callable[[], object]) -> tuple[torch.Tensor, torch.Tensor]:
        ks = trained_levels(model, self.cfg)
        losses, out = [], None
        with no_sync():
            for k in ks:
                if k == ks[-1]:
                    out = fmodel(x)  # the full model: no slicing
                else:
                    with set_level(model, k):
                        out = fmodel(x)
                losses.append(crit(out, y))
        osgd_backward(losses, model.parameters(), self.cfg.optimizer, self.cfg.unit)
        return losses[-1], out


def track_levels(model: nn.Module, example_inputs: torch.Tensor) -> None:
    """Record the model's widths as a new level when they differ from its last level's (the seed's first stage,
    and every stage after a growth step); a model without levels gets level 0."""
    seen = levels(model) if hasattr(model, ATTR) else []
    if not seen or seen[-1] != layer_widths(model):
        add_level(model, example_inputs)


def level_rows(model: nn.Module, example_inputs: torch.Tensor, evaluate: Callable[[nn.Module], EvalResult],
               full: tuple[CostReport, EvalResult], cost_model: CostModel | None = None) -> list[dict]:
    """One record per level: ``{level, macs, mmacs, priced, test_acc, test_loss, widths}``, each earlier level's
    from its extracted network (:func:`~nas_split.anytime.extract`; ``evaluate(net)`` gives its test result,
    ``priced`` under ``cost_model``, default the energy model), the last level's from ``full``, the full model's
    costs and test result as the stage measured them."""
    def row(k: int, cost: CostReport, ev: EvalResult, net: nn.Module) -> dict:
        return {"level": k, "macs": cost.macs, "mmacs": cost.mmacs, "priced": cost.priced, "test_acc": ev.acc,
                "test_loss": ev.loss, "widths": layer_widths(net)}

    rows = []
    for k in range(len(levels(model)) - 1):
        net = extract(model, k, example_inputs)
        rows.append(row(k, measure_cost(net, example_inputs, latency=False, cost_model=cost_model), evaluate(net), net))
    return rows + [row(len(rows), *full, model)]


def recalibrate_levels(model: nn.Module, loader, batches: int) -> None:
    """``bn: recalibrate``: every level but the full model gets statistics recomputed from ``batches`` batches."""
    for k in range(len(levels(model)) - 1):
        recalibrate(model, k, loader, batches)
