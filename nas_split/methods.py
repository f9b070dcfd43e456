"""One interface for every way of reaching a small accurate network: growth methods and baselines.

A method is registered by name (:func:`register_method`) and run with a :class:`MethodContext`, which holds the
data, the training recipe, builders for the thin seed / the full-width model / a width multiplier, the schedule
(seed epochs, rounds, epochs per round) and the MAC target.  Every method trains and records its stages through
:meth:`MethodContext.stage`, so all of them produce the same per-stage records.

Registered here: the splitting methods ``s2d``, ``fast``, ``s3d``, ``s3d-exact`` and ``energy`` (fast splitting
with the energy-aware LP), and ``retrain`` (another run's final architecture trained from scratch, the last step of
search → export → retrain).  The ``baselines`` package adds ``random``, ``firefly``, ``gradmax``, ``scratch``,
``random-arch`` and ``prune-{l1,taylor,slim,hessian,random}``: the core never imports it; every module named in the
``nas_split.methods`` entry-point group is imported on first use of the registry (:func:`load_plugins`), which is
how the baselines register and how a user's own package adds methods::

    # pyproject.toml of your package
    [project.entry-points."nas_split.methods"]
    my_methods = "my_pkg.methods"      # a module whose import calls nas_split.methods.register_method
"""
from __future__ import annotations

import difflib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from .cost import CostModel
from .engine import check_target, grow_rounds
from .errors import ConfigError, NasSplitError
from .grower import Grower
from .growth.depth_scores import DepthRound, grow_depth
from .growth.neurons import splittable_layers
from .growth.rates import SliceRates
from .growth.variance import fan_in_growth, transfer_betas, transfer_variance
from .splitting.analysis import Spectrum
from .splitting.variants import VARIANTS, Variant
from .stages import StageRunner, stage_seed
from .surgery import NotGrowableError

__all__ = ["MethodContext", "Method", "FromScratch", "RetrainMethod", "trains_from_scratch", "GrowthMethod",
           "SplittingMethod", "configure_depth", "HARNESS_OPTIONS", "split_options", "register_method",
           "create_method", "list_methods", "growth_methods", "load_plugins", "UnknownMethodError"]


class UnknownMethodError(NasSplitError, KeyError):
    """A method name that is not registered."""


@dataclass(kw_only=True)
class MethodContext(StageRunner):
    """What a method needs to run: builders, schedule and MAC target; :meth:`stage` records each stage."""

    #: the thin seed; keyword arguments override the builder's (``depths=[...]``: blocks per stage)
    build_seed: Callable[..., nn.Module]
    build_full: Callable[[], nn.Module]
    #: the full model at a uniform width multiplier; keyword arguments override the builder's
    build_width: Callable[..., nn.Module]
    seed_epochs: int
    epochs: int
    rounds: int
    finetune_epochs: int = 0
    target_mmacs: float | None = None

    @property
    def scratch_epochs(self) -> int:
        """Epochs of a network trained from scratch in one stage: ``seed_epochs + rounds x epochs +
        finetune_epochs``, what every method trains in all."""
        return self.seed_epochs + self.rounds * self.epochs + self.finetune_epochs


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


def growth_methods() -> list[str]:
    """Registered methods that grow a seed (:class:`GrowthMethod`): the splitting variants, ``vt``, ``firefly``,
    ``gradmax``, ``random``, and any plugin's."""
    load_plugins()
    out = []
    for name, factory in _METHODS.items():
        cls = factory.func if isinstance(factory, partial) else factory
        if isinstance(cls, type) and issubclass(cls, GrowthMethod):
            out.append(name)
    return sorted(out)


class FromScratch(Method):
    """An architecture trained from fresh weights in one stage of :attr:`MethodContext.scratch_epochs` epochs with
    the run's recipe and seed: ``scratch`` (uniform widths), ``random-arch`` (random widths) and ``retrain`` (the
    widths of another run's final model) differ only in :meth:`architecture`."""

    #: ``kind`` of the stage in the records.
    kind: str = "scratch"

    @abstractmethod
    def architecture(self, ctx: MethodContext) -> tuple[nn.Module, dict[str, Any]]:
        """The freshly initialised model, and extra fields for its stage record."""

    def epochs(self, ctx: MethodContext) -> int:
        """Epochs of the one stage: :attr:`MethodContext.scratch_epochs`, as every other method trains."""
        return ctx.scratch_epochs

    def run(self, ctx: MethodContext) -> nn.Module:
        model, extra = self.architecture(ctx)
        ctx.stage(model, self.kind, self.epochs(ctx), **extra)
        return model


class RetrainMethod(FromScratch):
    """Retrain an architecture from scratch: the final widths of a grown or pruned model (a
    :func:`~nas_split.save_grown` file, a ``grow`` checkpoint or a ``run`` directory's ``model.pt``), fresh weights
    (:func:`~nas_split.surgery.rebuild.fresh_model` at the run's seed), the scratch recipe.

    Args:
        architecture: path of the file holding the architecture (its weights are not used).
        level: retrain level ``level`` of an anytime model (:func:`nas_split.anytime.extract`'s widths) instead
            of the whole model.
    """

    kind = "retrain"

    def __init__(self, architecture: str, level: int | None = None):
        self.path, self.level = str(architecture), level
        self.payload: dict[str, Any] | None = None

    def _build(self, seed: int) -> nn.Module:
        from .surgery.export import grown_payload, load_grown, read_grown
        from .surgery.rebuild import fresh_model

        if self.payload is None and self.level is None:
            self.payload = read_grown(self.path)
        elif self.payload is None:
            from .anytime import LevelError, extract

            try:
                self.payload = grown_payload(extract(load_grown(self.path), self.level))
            except LevelError as e:
                raise NasSplitError(f"retrain: level {self.level} of {self.path}: {e}") from None
        return fresh_model(self.payload["spec"], self.payload["sizes"], seed)

    def check(self, ctx: MethodContext, seed_macs: float, full_macs: float) -> None:
        import torch

        model = self._build(ctx.recipe.seed)
        try:
            with torch.no_grad():
                model.eval()(ctx.example_inputs)
        except RuntimeError as e:
            raise NasSplitError(f"retrain: the architecture of {self.path} does not take this dataset's samples: "
                                f"{str(e).splitlines()[0]}") from None

    def architecture(self, ctx: MethodContext) -> tuple[nn.Module, dict[str, Any]]:
        level = {} if self.level is None else {"level": self.level}
        return self._build(ctx.recipe.seed), {"architecture": self.path, **level}


#: ``method_options`` keys the harness reads rather than the method (:func:`split_options`).
HARNESS_OPTIONS = ("anytime", "depth", "max_blocks_per_stage")


def split_options(options: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(the method's own options, the harness's)`` of a run's ``method_options`` (:data:`HARNESS_OPTIONS`:
    anytime levels and depth growth, which the run sets up around the method)."""
    options = dict(options or {})
    return {k: v for k, v in options.items() if k not in HARNESS_OPTIONS}, \
        {k: v for k, v in options.items() if k in HARNESS_OPTIONS}


def trains_from_scratch(name: str, options: dict[str, Any] | None = None) -> bool:
    """Whether method ``name`` trains its architecture from scratch (a :class:`FromScratch`: ``scratch``,
    ``random-arch``, ``retrain``), so that its run is its own retraining."""
    return isinstance(create_method(name, **split_options(options)[0]), FromScratch)


class GrowthMethod(Method):
    """Seed stage, then rounds of :meth:`grow` each followed by training, on the MAC schedule of
    :mod:`nas_split.engine` (``max_macs`` of :meth:`grow` is the round's cap; the method chooses *which* neurons)."""

    #: Most a round can multiply MACs by: every neuron split in two doubles both widths of a layer.
    max_round_factor: float = 4.0
    #: Whether the method can grow in depth too (:meth:`deepen`; the splitting variants and ``firefly``).
    grows_depth: bool = False
    #: New blocks a round may insert before its width step (0: width only); :func:`configure_depth` sets it.
    max_blocks: int = 0

    def grow(self, ctx: StageRunner, model: nn.Module, loader, optimizer, stage: int,
             max_macs: float | None) -> dict:
        """Grow ``model`` in place (at most to ``max_macs`` MACs when given); returns a JSON-ready summary.

        ``ctx`` gives ``example_inputs`` and the recipe (``ctx.recipe.seed``)."""
        raise NotImplementedError

    def deepen(self, ctx: StageRunner, model: nn.Module, loader, optimizer, stage: int, max_macs: float | None,
               width_scores=None, **scoring: Any) -> DepthRound:
        """The round's depth step before its width step (:func:`nas_split.growth.depth_scores.grow_depth`): at
        most :attr:`max_blocks` new blocks, Firefly's gate score (``scoring``: its ``steps``, ``lr``,
        ``penalty``), within ``max_macs``; ``width_scores`` (Firefly's) put blocks and channels in one ranking."""
        return grow_depth(model, ctx.example_inputs, loader, self.max_blocks, max_macs, width_scores, optimizer,
                          seed=stage_seed(ctx.recipe.seed, stage), **scoring)

    def check_growable(self, model: nn.Module, example_inputs) -> None:
        """Raise ``NotGrowableError`` (naming the problem) for a seed this method cannot grow."""
        if not splittable_layers(model, example_inputs):
            raise NotGrowableError(f"{self.name}: the model has no growable layer with a nonlinearity")

    def state_dict(self) -> dict[str, Any]:
        """What the method carries from one stage to the next, saved with each stage by ``grow`` and the NNI
        strategy: ``spectra`` (the fast analysis' directions) and ``stages`` (the learning-rate slices)."""
        return {"spectra": {}, "stages": {}}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module, example_inputs) -> None:
        """Restore :meth:`state_dict` for a resumed ``model``."""

    def check(self, ctx: MethodContext, seed_macs: float, full_macs: float) -> None:
        check_target(self.name, seed_macs, ctx.target_mmacs, ctx.rounds, self.max_round_factor)

    def run(self, ctx: MethodContext) -> nn.Module:
        """Seed, growth rounds, then (with ``finetune_epochs`` or one schedule over the run) a ``finetune`` stage
        that trains the final network until the run's total :attr:`~MethodContext.scratch_epochs`."""
        model = ctx.build_seed()
        optimizer = grow_rounds(ctx, model, self, seed_epochs=ctx.seed_epochs, epochs=ctx.epochs, rounds=ctx.rounds,
                                target_mmacs=ctx.target_mmacs)
        left = ctx.scratch_epochs - ctx.epochs_total
        if left > 0 and (ctx.finetune_epochs or ctx.schedule_epochs is not None):
            ctx.stage(model, "finetune", left, optimizer)
        return model


def configure_depth(method: Method, max_blocks: int, anytime: bool = False, key: str = "growth.depth") -> None:
    """Let a growth method insert at most ``max_blocks`` blocks per round (0: width only, nothing checked);
    refused in one line, naming ``key``, for a method or a combination that cannot honour it."""
    if not max_blocks:
        return
    if not (isinstance(method, GrowthMethod) and method.grows_depth):
        raise ConfigError(f"{key} applies to firefly and the splitting methods ({', '.join(VARIANTS)}), not to "
                          f"{method.name!r}")
    if getattr(method, "lra", False):
        raise ConfigError(f"{key} with lra: the learning-rate slices are kept by layer name, and new blocks rename "
                          "the layers after them; drop one of the two")
    named = [k for k in ("layers", "groups", "quotas") if getattr(method, "options", {}).get(k)]
    named += ["max_width"] * isinstance(getattr(method, "options", {}).get("max_width"), dict)
    if named:
        raise ConfigError(f"{key} with {named[0]}: it names layers, and new blocks rename the layers after them; "
                          "drop one of the two")
    if anytime:
        raise ConfigError(f"{key} with anytime: a level keeps a prefix of every layer's channels, and a new block "
                          "has none in the earlier levels; drop one of the two")
    method.max_blocks = max_blocks


class SplittingMethod(GrowthMethod):
    """A splitting variant (:data:`~nas_split.splitting.variants.VARIANTS`) as a growth method: each round a
    :class:`~nas_split.Grower` analyses, selects and splits.  With a round cap the cap alone sets how many neurons
    split (``grow_ratio`` applies to rounds without one); the fast analysis warm-starts from the previous round's
    directions (:attr:`spectra`, kept in ``grow``'s checkpoints).  ``lra=True`` gives each round's copies their
    own learning rate (:mod:`nas_split.growth.rates`, as ``vt`` does); ``variance_transfer=True`` rescales the
    consumers of the split layers after each round (:mod:`nas_split.growth.variance`, as ``vt`` does)."""

    grows_depth = True

    def __init__(self, variant: Variant, grow_ratio: float = 0.3, eps: float = 1e-2, lra: bool = False,
                 variance_transfer: bool = False, **options: Any):
        self.variant, self.grow_ratio, self.eps, self.lra, self.options = variant, grow_ratio, eps, lra, options
        self.variance_transfer = variance_transfer
        self.max_round_factor = variant.max_round_factor
        self.spectra: dict[str, Spectrum] = {}
        self.rates = SliceRates()  # with lra: the growth stage of each channel and its learning rate
        self.verified: set[str] = set()  # layers a round's Grower verified growable: the next rounds trust them

    def check_growable(self, model: nn.Module, example_inputs) -> None:
        self.grower(model, example_inputs, None, 0, None)

    def state_dict(self) -> dict[str, Any]:
        return {"spectra": {k: vars(v) for k, v in self.spectra.items()}, "stages": self.rates.stages}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module, example_inputs) -> None:
        self.spectra = {k: Spectrum(**v) for k, v in (state.get("spectra") or {}).items()}
        if self.lra and state.get("stages"):  # the rates of the stage the run stopped in
            self.rates.restore(model, example_inputs, state["stages"])

    def grower(self, model: nn.Module, example_inputs, optimizer, seed: int, max_macs: float | None,
               cost_model: CostModel | None = None) -> Grower:
        """The :class:`~nas_split.Grower` of one round (raises ``NotGrowableError`` for a model without a
        layer to split); ``cost_model`` prices channels for the LP (with ``cost="model"``)."""
        g = Grower(model, example_inputs, self.variant.name, eps=self.eps,
                   grow_ratio=self.grow_ratio if max_macs is None else None, optimizer=optimizer, seed=seed,
                   max_macs=max_macs, cost_model=cost_model, trusted=self.verified, **self.options)
        self.verified = g.verified
        return g

    def grow(self, ctx, model, loader, optimizer, stage, max_macs):
        t0 = time.perf_counter()
        depth = self.deepen(ctx, model, loader, optimizer, stage, max_macs) if self.max_blocks else None
        depth_seconds = time.perf_counter() - t0
        if depth is not None:  # the fast analysis' directions and the verified layers follow their new names
            self.spectra = {depth.rename(k): v for k, v in self.spectra.items()}
            self.verified = {depth.rename(k) for k in self.verified}  # (a new block's layers are checked next:
            # a residual block's trial split keeps the function whatever, its last norm being zero)
        g = self.grower(model, ctx.example_inputs, optimizer, stage_seed(ctx.recipe.seed, stage), max_macs,
                        ctx.cost_model)
        g.spectra = self.spectra
        graph = g.graph() if self.variance_transfer else None  # before the split: who consumes the split layers
        report = g.step(loader)
        self.spectra = g.spectra
        info = report.to_dict()
        if graph is not None:
            grows = fan_in_growth(graph, {n: b - a for n, (a, b) in report.widths.items()})
            modules = dict(model.named_modules())
            betas, norms = transfer_betas(model, ctx.example_inputs, grows,
                                          {n: modules[n].weight.shape[1] - k for n, k in grows.items()})
            transfer_variance(model, betas, norms)
            info["variance_transfer"] = betas
        if self.lra:  # the copies a round appends are that stage's slice (nas_split.growth.rates)
            info["lra"] = self.rates.record(model, ctx.example_inputs, report.widths, stage)
        if depth is not None:  # the block scoring is analysis too
            info["depth"] = depth.to_dict()
            info["analysis_seconds"] += depth_seconds
        return info


for _variant in VARIANTS.values():
    register_method(_variant.name)(partial(SplittingMethod, _variant))
register_method("retrain")(RetrainMethod)
