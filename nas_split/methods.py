"""One interface for every way of reaching a small accurate network: growth methods and baselines.

A method is registered by name (:func:`register_method`) and run with a :class:`MethodContext`, which holds the
data, the training recipe, builders for the thin seed / the full-width model / a width multiplier, the schedule
(seed epochs, rounds, epochs per round) and the MAC target.  Every method trains and records its stages through
:meth:`MethodContext.stage`, so all of them produce the same per-stage records.

Registered here: the splitting methods ``s2d``, ``fast``, ``s3d``, ``s3d-exact`` and ``energy`` (fast splitting
with the energy-aware LP).  The ``baselines`` package adds ``random``, ``firefly``, ``gradmax``, ``scratch``
and ``prune-{l1,taylor,slim,hessian,random}``: the core never imports it; every module named in the
``nas_split.methods`` entry-point group is imported on first use of the registry (:func:`load_plugins`), which is
how the baselines register and how a user's own package adds methods::

    # pyproject.toml of your package
    [project.entry-points."nas_split.methods"]
    my_methods = "my_pkg.methods"      # a module whose import calls nas_split.methods.register_method
"""
from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from .errors import ConfigError, NasSplitError
from .grower import Grower
from .splitting.variants import VARIANTS, Variant
from .stages import StageRunner, stage_seed

__all__ = ["MethodContext", "Method", "GrowthMethod", "register_method", "create_method", "list_methods",
           "load_plugins", "UnknownMethodError"]


class UnknownMethodError(NasSplitError, KeyError):
    """A method name that is not registered."""


@dataclass(kw_only=True)
class MethodContext(StageRunner):
    """What a method needs to run: builders, schedule and MAC target; :meth:`stage` records each stage."""

    build_seed: Callable[[], nn.Module]
    build_full: Callable[[], nn.Module]
    build_width: Callable[[float], nn.Module]
    seed_epochs: int
    epochs: int
    rounds: int
    target_mmacs: float | None = None


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


#: The entry-point group whose modules register methods when imported.
ENTRY_POINT_GROUP = "nas_split.methods"
_plugins_loaded = False


def load_plugins() -> None:
    """Import every module of the :data:`ENTRY_POINT_GROUP` entry points (once per process), so their methods
    register; the baselines are one such module."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def list_methods() -> list[str]:
    """Registered method names (baselines included)."""
    load_plugins()
    return sorted(_METHODS)


def create_method(name: str, **options: Any) -> Method:
    """The method ``name`` with its options."""
    load_plugins()
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(_METHODS))}"
        raise UnknownMethodError(f"unknown method {name!r}{hint}")
    method = _METHODS[name](**options)
    method.name = name
    return method


class GrowthMethod(Method):
    """Seed stage, then rounds of ``grow(...) -> info`` each followed by training.

    With a MAC target ``T`` the rounds follow a geometric MAC schedule from the seed's ``M_0``: round ``r`` of
    ``R`` may reach ``M_0 (T / M_0)^{r/R}`` MACs, so every round adds the same factor, the last lands on the
    target and a grown model trains for the same epochs as the baselines it is compared with.  The method
    chooses *which* neurons; the schedule sets *how many* (``max_macs`` of :meth:`grow`).
    """

    def grow(self, ctx: MethodContext, model: nn.Module, loader, optimizer, stage: int,
             max_macs: float | None) -> dict:
        """Grow ``model`` in place (at most to ``max_macs`` MACs when given); returns a JSON-ready summary."""
        raise NotImplementedError

    #: Most a round can multiply MACs by: every neuron split in two doubles both widths of a layer.
    max_round_factor: float = 4.0

    def check(self, ctx: MethodContext, seed_macs: float, full_macs: float) -> None:
        if ctx.target_mmacs is None:
            return
        if ctx.target_mmacs * 1e6 <= seed_macs:
            raise ConfigError(f"{self.name}: MAC target {ctx.target_mmacs} MMACs is not above the seed's "
                             f"{seed_macs / 1e6:.3f} MMACs")
        reach = seed_macs * self.max_round_factor ** ctx.rounds
        if ctx.target_mmacs * 1e6 > reach:
            raise ConfigError(f"{self.name}: MAC target {ctx.target_mmacs} MMACs is out of reach of {ctx.rounds} "
                             f"round(s) from the seed's {seed_macs / 1e6:.3f} MMACs (at most {reach / 1e6:.3f}); "
                             "add rounds or widen the seed")

    def run(self, ctx: MethodContext) -> nn.Module:
        model = ctx.build_seed()
        opt = ctx.stage(model, "seed", ctx.seed_epochs)
        seed_macs = ctx.records[-1]["cost"]["macs"]
        for r in range(1, ctx.rounds + 1):
            if ctx.target_mmacs is not None and ctx.records[-1]["cost"]["mmacs"] >= ctx.target_mmacs:
                break
            budget = None if ctx.target_mmacs is None else \
                seed_macs * (ctx.target_mmacs * 1e6 / seed_macs) ** (r / ctx.rounds)
            tr, _, _ = ctx.loaders(len(ctx.records))
            info = self.grow(ctx, model, tr, opt, r, budget)
            opt = ctx.stage(model, "round", ctx.epochs, optimizer=opt, growth=info,
                            analysis_seconds=info.get("analysis_seconds", 0.0))
        return model


def _splitting(variant: Variant):
    def factory(grow_ratio: float = 0.3, eps: float = 1e-2, **options: Any) -> GrowthMethod:
        class Splitting(GrowthMethod):
            max_round_factor = variant.max_round_factor

            def grow(self, ctx, model, loader, optimizer, stage, max_macs):
                g = Grower(model, ctx.example_inputs, variant.name, eps=eps,
                           grow_ratio=grow_ratio if max_macs is None else None, optimizer=optimizer,
                           seed=stage_seed(ctx.recipe.seed, stage), max_macs=max_macs, **options)
                return g.step(loader).to_dict()
        return Splitting()
    return factory


for _variant in VARIANTS.values():
    register_method(_variant.name)(_splitting(_variant))
