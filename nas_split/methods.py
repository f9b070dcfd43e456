"""One interface for every way of reaching a small accurate network: growth methods and baselines.

A method is registered by name (:func:`register_method`) and run with a :class:`MethodContext`, which holds the
data, the training recipe, builders for the thin seed / the full-width model / a width multiplier, the schedule
(seed epochs, rounds, epochs per round) and the MAC target.  Every method trains and records its stages through
:meth:`MethodContext.stage`, so all of them produce the same per-stage records.

Registered here: the splitting methods ``s2d``, ``fast``, ``s3d``, ``s3d-exact`` and ``energy`` (fast splitting
with the energy-aware LP).  The ``baselines`` package adds ``random``, ``firefly``, ``gradmax``, ``scratch``
and ``prune-{l1,taylor,slim,hessian,random}`` when imported (:func:`load_baselines`).
"""
from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .cost import measure_cost
from .data import DataSplits
from .grower import Grower
from .runlog import layer_widths
from .training import TrainConfig, Trainer

__all__ = ["MethodContext", "Method", "GrowthMethod", "register_method", "create_method", "list_methods",
           "load_baselines", "UnknownMethodError"]


class UnknownMethodError(KeyError):
    """A method name that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class MethodContext:
    """What a method needs to run, and :meth:`stage` to train, evaluate and record one stage."""

    data: DataSplits
    recipe: TrainConfig
    build_seed: Callable[[], nn.Module]
    build_full: Callable[[], nn.Module]
    build_width: Callable[[float], nn.Module]
    example_inputs: torch.Tensor
    seed_epochs: int
    epochs: int
    rounds: int
    target_mmacs: float | None = None
    record: Callable[[dict], None] = lambda rec: None
    latency: bool = True
    epoch_hook: Callable[[int, dict], None] = lambda epoch, rec: None
    trainer: Trainer | None = None
    records: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.trainer = self.trainer or Trainer(self.recipe)

    @property
    def epochs_total(self) -> int:
        """Epochs trained so far in this run."""
        return sum(r["epochs"] for r in self.records)

    def loaders(self, stage: int):
        """Train / val / test loaders, shuffled with a seed derived from ``(seed, stage)``."""
        seed = self.recipe.seed * 1009 + stage
        self.trainer.fabric.seed_everything(seed, verbose=False)
        return self.data.loaders(self.recipe.batch_size, self.recipe.eval_batch_size, self.recipe.num_workers, seed)

    def stage(self, model: nn.Module, kind: str, epochs: int, optimizer: torch.optim.Optimizer | None = None,
              regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
              **extra: Any) -> torch.optim.Optimizer | None:
        """Train ``model`` for ``epochs`` (0: evaluate only), evaluate on test, measure costs, record the stage."""
        stage = len(self.records)
        tr, va, te = self.loaders(stage)
        done = self.epochs_total
        fit = self.trainer.fit(model, tr, va, epochs=epochs, optimizer=optimizer, desc=f"{kind} {stage}",
                               regularizer=regularizer,
                               on_epoch_end=lambda r: self.epoch_hook(done + r["epoch"], r)) if epochs else None
        test = self.trainer.evaluate(model, te)
        model.cpu()
        cost = measure_cost(model, self.example_inputs, latency=self.latency)
        rec = {"stage": stage, "kind": kind, "epochs": epochs, "epochs_total": self.epochs_total + epochs,
               "test_acc": test.acc, "test_loss": test.loss,
               "val_acc": fit.history[-1].get("val_acc") if fit and fit.history else None,
               "train_seconds": fit.seconds if fit else 0.0, "history": fit.history if fit else [],
               "cost": cost.to_dict(layers=True), "widths": layer_widths(model), **extra}
        self.records.append(rec)
        self.record(rec)
        return fit.optimizer if fit else optimizer


class Method(ABC):
    """A way to produce a network under a budget; ``run`` records its stages through ``ctx.stage``."""

    name: str = "method"

    @abstractmethod
    def run(self, ctx: MethodContext) -> nn.Module:
        """Run the method; returns the final model."""

    @abstractmethod
    def check(self, ctx: MethodContext, seed_macs: float, full_macs: float) -> None:
        """Refuse a context the method cannot meet (called before any training)."""


_METHODS: dict[str, Callable[..., Method]] = {}


def register_method(name: str) -> Callable:
    """Decorator registering a :class:`Method` factory under ``name``."""
    def deco(factory: Callable[..., Method]) -> Callable[..., Method]:
        _METHODS[name] = factory
        return factory
    return deco


def load_baselines() -> None:
    """Import ``baselines`` so that its methods register (kept lazy: the core never imports it)."""
    import baselines.methods  # noqa: F401


def list_methods() -> list[str]:
    """Registered method names (baselines included)."""
    load_baselines()
    return sorted(_METHODS)


def create_method(name: str, **options: Any) -> Method:
    """The method ``name`` with its options."""
    load_baselines()
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(_METHODS))}"
        raise UnknownMethodError(f"unknown method {name!r}{hint}")
    method = _METHODS[name](**options)
    method.name = name
    return method


class GrowthMethod(Method):
    """Seed stage, then rounds of ``grow(model, loader, optimizer) -> info`` followed by training.

    Stops before a round once the model reaches ``ctx.target_mmacs``.
    """

    def grow(self, ctx: MethodContext, model: nn.Module, loader, optimizer, stage: int) -> dict:
        raise NotImplementedError

    def check(self, ctx: MethodContext, seed_macs: float, full_macs: float) -> None:
        if ctx.target_mmacs is not None and ctx.target_mmacs * 1e6 <= seed_macs:
            raise ValueError(f"{self.name}: MAC target {ctx.target_mmacs} MMACs is not above the seed's "
                             f"{seed_macs / 1e6:.3f} MMACs")

    def run(self, ctx: MethodContext) -> nn.Module:
        model = ctx.build_seed()
        opt = ctx.stage(model, "seed", ctx.seed_epochs)
        for r in range(1, ctx.rounds + 1):
            if ctx.target_mmacs is not None and ctx.records[-1]["cost"]["mmacs"] >= ctx.target_mmacs:
                break
            tr, _, _ = ctx.loaders(len(ctx.records))
            info = self.grow(ctx, model, tr, opt, r)
            opt = ctx.stage(model, "round", ctx.epochs, optimizer=opt, growth=info,
                            analysis_seconds=info.get("analysis_seconds", 0.0))
        return model


def _splitting(method: str, energy_aware: bool = False):
    def factory(grow_ratio: float = 0.3, eps: float = 1e-2, **options: Any) -> GrowthMethod:
        class Splitting(GrowthMethod):
            def grow(self, ctx, model, loader, optimizer, stage):
                g = Grower(model, ctx.example_inputs, method, grow_ratio=grow_ratio, eps=eps,
                           energy_aware=energy_aware, optimizer=optimizer, seed=ctx.recipe.seed * 1009 + stage,
                           **options)
                return g.step(loader).to_dict()
        return Splitting()
    return factory


for _name in ("s2d", "fast", "s3d", "s3d-exact"):
    register_method(_name)(_splitting(_name))
register_method("energy")(_splitting("fast", energy_aware=True))
