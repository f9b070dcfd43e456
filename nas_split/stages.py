"""Training stages: the one step every run repeats — seed, train, evaluate, measure costs, record.

``nas-split train``, ``grow`` and every registered method record their stages through :class:`StageRunner`, so
their ``results.json`` stages have the same fields and the same seeding: stage ``k`` of a run with seed ``s``
reseeds every random source with :func:`stage_seed` ``(s, k)``, which makes a resumed run repeat the choices of
an uninterrupted one.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .anytime import levels, set_level
from .anytime_training import (
    AnytimeConfig,
    LevelStep,
    level_rows,
    recalibrate_levels,
    track_levels,
    trained_levels,
)
from .cost import CostModel, measure_cost, training_macs
from .data import DataSplits
from .numerics import model_device
from .records import StageRecord
from .surgery import layer_widths
from .training import TrainConfig, Trainer

__all__ = ["stage_seed", "StageRunner"]


def stage_seed(seed: int, stage: int) -> int:
    """The seed of stage ``stage`` of a run seeded with ``seed``."""
    return seed * 1009 + stage


@dataclass(kw_only=True)
class StageRunner:
    """Trains, evaluates and records stages; ``records`` holds the stages so far (restored ones on resume)."""

    data: DataSplits
    recipe: TrainConfig
    example_inputs: torch.Tensor
    record: Callable[[StageRecord], None] = lambda rec: None
    epoch_hook: Callable[[int, dict], None] = lambda epoch, rec: None
    latency: bool = True
    cost_model: CostModel | None = None
    #: ``schedule_span: run``: the run's total epochs, one learning-rate schedule over all stages (``None``: each
    #: stage's fit has its own)
    schedule_epochs: int | None = None
    #: epochs of linear learning-rate warm-up at the start of every stage that follows a growth step
    growth_warmup_epochs: float = 0.0
    trainer: Trainer | None = None
    records: list[StageRecord] = field(default_factory=list)
    #: an anytime run (:mod:`nas_split.anytime_training`): every stage adds the model's widths as a level, trains
    #: the levels together and records each level's MACs and test accuracy (``levels`` of the stage record)
    anytime: AnytimeConfig | None = None

    def __post_init__(self):
        self.trainer = self.trainer or Trainer(self.recipe)

    @property
    def epochs_total(self) -> int:
        """Epochs trained so far in this run."""
        return sum(r.epochs for r in self.records)

    def loaders(self, stage: int):
        """Train / val / test loaders of stage ``stage``, every random source reseeded with :func:`stage_seed`.

        Under several processes the loaders draw global batches (``world ×`` the recipe's batch sizes), the same
        in every process; the trainer and the growth analysis take each process's rows of them."""
        seed = stage_seed(self.recipe.seed, stage)
        self.trainer.fabric.seed_everything(seed, verbose=False)
        world = self.trainer.fabric.world_size
        return self.data.loaders(self.recipe.batch_size * world, self.recipe.eval_batch_size * world,
                                 self.recipe.num_workers, seed)

    def _levels_val(self, model: nn.Module, val, rec: dict) -> dict:
        """An epoch's record with every level's validation top-1 (``val_acc_levels``) in an anytime run."""
        if self.anytime is None or val is None or len(levels(model)) < 2:
            return rec
        accs = []
        for k in range(len(levels(model))):
            with set_level(model, k):
                accs.append(self.trainer.evaluate(model, val).acc)
        rec["val_acc_levels"] = accs  # in the epoch's record: the stage's history keeps it
        return rec

    def stage(self, model: nn.Module, kind: str, epochs: int, optimizer: torch.optim.Optimizer | None = None,
              regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
              **extra: Any) -> torch.optim.Optimizer | None:
        """Train ``model`` for ``epochs`` (0: evaluate only), evaluate on test, measure costs, record the stage.

        The record's ``train_macs`` is :func:`~nas_split.cost.training_macs` of the samples trained on at the
        model's MACs; ``extra`` may add ``analysis_macs`` (the decision passes before the stage).  The fit is a
        part of the run's one schedule with :attr:`schedule_epochs`, and a stage whose ``extra`` holds a
        ``growth`` starts with :attr:`growth_warmup_epochs` of warm-up.

        Returns the optimizer (the one given, or the one the fit created).
        """
        stage = len(self.records)
        tr, va, te = self.loaders(stage)
        done = self.epochs_total
        if self.anytime is not None:
            track_levels(model, self.example_inputs)
        fit = self.trainer.fit(model, tr, va, epochs=epochs, optimizer=optimizer, desc=f"{kind} {stage}",
                               regularizer=regularizer,
                               schedule=None if self.schedule_epochs is None else (done, self.schedule_epochs),
                               rewarm_epochs=self.growth_warmup_epochs if "growth" in extra else 0.0,
                               on_epoch_end=lambda r: self.epoch_hook(done + r["epoch"],
                                                                      self._levels_val(model, va, r)),
                               train_step=LevelStep(self.anytime) if self.anytime else None) if epochs else None
        if self.anytime is not None and self.anytime.bn == "recalibrate":
            recalibrate_levels(model, tr, self.anytime.recalibrate_batches)
        test = self.trainer.evaluate(model, te)
        # costs (and CPU latency) on a CPU copy: the live model stays on its device for the growth that follows
        on_cpu = model if model_device(model).type == "cpu" else copy.deepcopy(model).cpu()
        cost = measure_cost(on_cpu, self.example_inputs, latency=self.latency, cost_model=self.cost_model)
        trained_macs = cost.macs
        if self.anytime is not None:  # each sample trains every trained level: Σ_k MACs_k per sample
            rows = level_rows(on_cpu, self.example_inputs, lambda net: self.trainer.evaluate(net, te), (cost, test),
                              self.cost_model)
            extra["levels"] = rows
            trained_macs = sum(rows[k]["macs"] for k in trained_levels(model, self.anytime))
        if getattr(model, "nas_split_depth", None):  # a deepened model: blocks per stage / inserted layers
            extra.setdefault("depth", dict(model.nas_split_depth))
        extra = {"train_samples": fit.samples if fit else 0,
                 "train_macs": training_macs(trained_macs, fit.samples) if fit else 0.0, **extra}
        rec = StageRecord(stage, kind, epochs, done + epochs, test.acc, test.loss,
                          fit.history[-1].get("val_acc") if fit and fit.history else None,
                          fit.seconds if fit else 0.0, fit.history if fit else [], cost.to_dict(layers=True),
                          layer_widths(model), extra)
        self.records.append(rec)
        self.record(rec)
        return fit.optimizer if fit else optimizer
