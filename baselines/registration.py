"""Registers the baselines with nas-split's method registry (imported lazily by ``nas_split.methods``)."""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from nas_split.cost import PassCounter
from nas_split.distributed import ShardedBatches, summed
from nas_split.errors import ConfigError
from nas_split.growth.rates import LayerRates, SliceRates
from nas_split.methods import FromScratch, GrowthMethod, Method, MethodContext, register_method
from nas_split.stages import stage_seed
from nas_split.surgery.rebuild import fresh_model, resized_sizes, width_groups

from .firefly import candidate_scores, firefly_candidates, firefly_grow
from .gradmax import gradmax_counts, gradmax_grow
from .pruning import CRITERIA, bn_l1_penalty, prune_to_macs
from .random_growth import random_grow
from .scratch import bottleneck_widths, log_distance, match_width, random_widths
from .variance_transfer import vt_counts, vt_grow

__all__ = ["PruneMethod", "ScratchMethod", "RandomArchMethod", "BottleneckMethod"]


class _Random(GrowthMethod):
    def __init__(self, grow_ratio: float = 0.3, eps: float = 1e-2):
        self.grow_ratio, self.eps = grow_ratio, eps

    def grow(self, ctx, model, loader, optimizer, stage, max_macs):
        rep = random_grow(model, ctx.example_inputs, self.grow_ratio, self.eps, optimizer,
                          torch.Generator().manual_seed(stage_seed(ctx.recipe.seed, stage)), max_macs)
        return {"new_neurons": rep.new_neurons}


class _Firefly(GrowthMethod):
    grows_depth = True

    def __init__(self, grow_ratio: float = 0.35, k: int = 8, steps: int = 20, eps: float = 1.0, lr: float = 1e-3,
                 penalty: float = 1e-2, init_scale: float = 0.1, calibrate_norms: bool = True):
        self.grow_ratio, self.k, self.eps, self.calibrate_norms = grow_ratio, k, eps, calibrate_norms
        self.options = {"steps": steps, "lr": lr, "penalty": penalty, "init_scale": init_scale}

    def grow(self, ctx, model, loader, optimizer, stage, max_macs):
        def generator():
            return torch.Generator().manual_seed(stage_seed(ctx.recipe.seed, stage))

        depth = None
        if self.max_blocks:  # blocks and channels ranked together; the channels are scored again once deepened
            width = None if max_macs is None else candidate_scores(firefly_candidates(
                model, ctx.example_inputs, loader, k=self.k, generator=generator(), **self.options))
            depth = self.deepen(ctx, model, loader, optimizer, stage, max_macs, width,
                                **{k: v for k, v in self.options.items() if k in ("steps", "lr", "penalty")})
        rep = firefly_grow(model, ctx.example_inputs, loader, self.grow_ratio, self.k, self.eps, optimizer,
                           max_macs=max_macs, calibrate_norms=self.calibrate_norms, generator=generator(),
                           **self.options)
        info = {"new_neurons": rep.new_neurons, "split": sum(len(v) for v in rep.splits.values()),
                "new": sum(rep.new.values())}
        if depth is not None:
            info["depth"] = depth.to_dict()
        return info


class _GradMax(GrowthMethod):
    def __init__(self, grow_ratio: float = 0.25, batches: int = 1, scale: float = 0.5, calibrate_norms: bool = True):
        self.grow_ratio, self.batches, self.scale, self.calibrate_norms = grow_ratio, batches, scale, calibrate_norms

    def grow(self, ctx, model, loader, optimizer, stage, max_macs):
        counts = gradmax_counts(model, ctx.example_inputs, self.grow_ratio, max_macs)
        rep = gradmax_grow(model, ctx.example_inputs, counts, loader, optimizer=optimizer, batches=self.batches,
                           scale=self.scale, calibrate_norms=self.calibrate_norms)
        return {"new_neurons": rep.new_neurons}


class _VarianceTransfer(GrowthMethod):
    """``vt``: paired new neurons, variance transfer and learning-rate adaptation (:mod:`.variance_transfer`)."""

    def __init__(self, grow_ratio: float = 0.2, variance_transfer: bool = True, lra: bool = True, mup: bool = False):
        self.grow_ratio, self.variance_transfer, self.lra, self.mup = grow_ratio, variance_transfer, lra, mup
        self.rates, self.layer_rates = SliceRates(), LayerRates()

    def state_dict(self) -> dict:
        return {"spectra": {}, "stages": self.rates.stages, "mup_base": self.layer_rates.base}

    def load_state_dict(self, state, model, example_inputs) -> None:
        if self.lra and state.get("stages"):
            self.rates.restore(model, example_inputs, state["stages"])
        if self.mup and state.get("mup_base"):
            self.layer_rates.base = {k: list(v) for k, v in state["mup_base"].items()}
            self.layer_rates.set(model, example_inputs)

    def grow(self, ctx, model, loader, optimizer, stage, max_macs):
        if self.mup:
            self.layer_rates.remember(model, ctx.example_inputs)
        modules = dict(model.named_modules())
        pairs = vt_counts(model, ctx.example_inputs, self.grow_ratio, max_macs)
        widths = {n: modules[n].weight.shape[0] for n in pairs}
        rep = vt_grow(model, ctx.example_inputs, pairs, optimizer,
                      torch.Generator().manual_seed(stage_seed(ctx.recipe.seed, stage)), self.variance_transfer)
        info = {"new_neurons": rep.new_neurons, "variance_transfer": rep.beta}
        if self.lra:
            info["lra"] = self.rates.record(model, ctx.example_inputs,
                                            {n: (widths[n], widths[n] + k) for n, k in rep.added.items()}, stage)
        if self.mup:
            info["mup"] = self.layer_rates.set(model, ctx.example_inputs)
        return info


def _depths(name: str, depths: list[int] | None) -> dict:
    """``{"depths": [...]}`` for the builder (``{}`` without), checked: positive block counts."""
    if depths is None:
        return {}
    if not (isinstance(depths, list) and depths and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1
                                                          for d in depths)):
        raise ConfigError(f"{name}: depths lists positive block counts per stage, got {depths!r}")
    return {"depths": list(depths)}


class PruneMethod(Method):
    """Train the full-width model, prune it to the MAC target, fine-tune for the rounds' epochs.

    ``prune-<criterion>`` prunes uniformly: every layer loses the same fraction of its channels, so the widths
    keep the full model's proportions.  ``prune-<criterion>-global`` (``global_pruning=True``, Torch-Pruning's
    ``global_pruning=True``) ranks the channels of all layers together, so the criterion chooses the widths
    (each layer keeps at least 10 % of its channels); see :mod:`baselines.pruning`.
    """

    def __init__(self, criterion: str, round_to: int | None = None, slim_penalty: float = 1e-4,
                 global_pruning: bool = False):
        if criterion not in CRITERIA:
            raise ConfigError(f"unknown pruning criterion {criterion!r}; known: {', '.join(CRITERIA)}")
        self.criterion, self.round_to, self.slim_penalty = criterion, round_to, slim_penalty
        self.global_pruning = global_pruning

    def check(self, ctx: MethodContext, seed_macs: float, full_macs: float) -> None:
        if ctx.target_mmacs is None:
            raise ConfigError(f"{self.name} needs a MAC target (target_mmacs)")
        if ctx.target_mmacs * 1e6 >= full_macs:
            raise ConfigError(f"{self.name}: MAC target {ctx.target_mmacs} MMACs is not below the full model's "
                             f"{full_macs / 1e6:.3f} MMACs")

    def run(self, ctx: MethodContext) -> nn.Module:
        model = ctx.build_full()
        reg = partial(bn_l1_penalty, coef=self.slim_penalty) if self.criterion == "slim" else None
        ctx.stage(model, "full", ctx.seed_epochs, regularizer=reg)
        tr, _, _ = ctx.loaders(len(ctx.records))
        with PassCounter(model) as passes:
            rep = prune_to_macs(model, ctx.example_inputs, ctx.target_mmacs * 1e6, self.criterion,
                                loader=ShardedBatches(tr), round_to=self.round_to,
                                global_pruning=self.global_pruning)
        ctx.stage(model, "pruned", 0, pruning={"macs_before": rep.macs_before, "macs_after": rep.macs_after,
                                              "target_error": rep.error, "steps": rep.steps},
                  analysis_macs=summed(passes.macs(rep.macs_before)))
        ctx.stage(model, "finetune", ctx.epochs * ctx.rounds + ctx.finetune_epochs)
        return model


class ScratchMethod(FromScratch):
    """The uniform width multiplier whose MACs match the target, trained for the same total epochs.

    Args:
        epoch_fraction: train ``round(epoch_fraction x scratch epochs)`` epochs (at least 1) instead, e.g. the
            growth runs' training MACs over scratch's, for scratch at equal *training* compute.  Such a run is
            not a point of the scratch curve.
        depths: blocks per stage of a timm MobileNet (default: the backbone's), e.g. a depth-grown run's
            ``stage_depths`` or the seed's, for uniform scratch at that depth profile.
    """

    def __init__(self, epoch_fraction: float = 1.0, depths: list[int] | None = None):
        if not 0 < epoch_fraction <= 1:
            raise ConfigError(f"scratch: epoch_fraction must lie in (0, 1], got {epoch_fraction}")
        self.epoch_fraction = float(epoch_fraction)
        self.over = _depths("scratch", depths)
        self._mult: float | None = None  # found by check()

    def check(self, ctx: MethodContext, seed_macs: float, full_macs: float) -> None:
        if ctx.target_mmacs is None:
            raise ConfigError("scratch needs a MAC target (target_mmacs)")
        try:  # a target no width multiplier reaches is refused here, before anything is written
            self._mult = match_width(partial(ctx.build_width, **self.over), ctx.example_inputs,
                                     ctx.target_mmacs * 1e6)[0]
        except (TypeError, ValueError) as e:  # TypeError: a backbone without blocks per stage
            if isinstance(e, TypeError) and not self.over:
                raise
            raise ConfigError(f"scratch: {str(e).splitlines()[0]}") from None

    def architecture(self, ctx: MethodContext) -> tuple[nn.Module, dict]:
        if self._mult is None:
            self.check(ctx, 0.0, 0.0)
        extra = {"width_mult": self._mult, **self.over}
        if self.epoch_fraction != 1:
            extra["epoch_fraction"] = self.epoch_fraction
        return ctx.build_width(self._mult, **self.over), extra

    def epochs(self, ctx: MethodContext) -> int:
        if self.epoch_fraction == 1:
            return super().epochs(ctx)
        return max(1, round(self.epoch_fraction * ctx.scratch_epochs))


class _WidthsArch(FromScratch):
    """An architecture control: per-layer widths at the target's MACs (:meth:`widths`), trained like ``scratch``;
    its stage record holds the widths and their ``log_distance`` from the seed's profile scaled uniformly.
    ``depths`` builds the seed with that many blocks per stage first (a timm MobileNet)."""

    def __init__(self, depths: list[int] | None = None):
        self._widths: dict[str, int] | None = None
        self.over = _depths(type(self).kind, depths)

    def widths(self, ctx: MethodContext, seed: nn.Module) -> dict[str, int]:
        """The widths (``{root layer: width}``) at ``ctx.target_mmacs``; ``ValueError`` if it is out of reach."""
        raise NotImplementedError

    def check(self, ctx: MethodContext, seed_macs: float, full_macs: float) -> None:
        if ctx.target_mmacs is None:
            raise ConfigError(f"{self.name} needs a MAC target (target_mmacs)")
        try:
            self._widths = self.widths(ctx, ctx.build_seed(**self.over))
        except (TypeError, ValueError) as e:  # TypeError: a backbone without blocks per stage
            if isinstance(e, TypeError) and not self.over:
                raise
            raise ConfigError(f"{self.name}: {str(e).splitlines()[0]}") from None

    def architecture(self, ctx: MethodContext) -> tuple[nn.Module, dict]:
        if self._widths is None:
            self.check(ctx, 0.0, 0.0)
        seed = ctx.build_seed(**self.over)
        sizes = resized_sizes(seed, ctx.example_inputs, self._widths)
        return fresh_model(seed.nas_split_spec, sizes, ctx.recipe.seed), {
            "arch_widths": self._widths, **self.over,
            "log_distance": log_distance(self._widths, width_groups(seed, ctx.example_inputs))}


class RandomArchMethod(_WidthsArch):
    """The architecture control: random per-layer widths at the target's MACs, trained like ``scratch``.

    Every independent width ``w_l`` of the seed (:func:`~nas_split.surgery.rebuild.width_groups`) is multiplied by
    ``f_l ~ log-uniform[1/spread, spread]`` and all by one scale ``s`` found by bisection so that the model's MACs
    are closest to the target: ``w_l = max(1, round(s f_l w_l))`` (:func:`.scratch.random_widths`).  ``draw``
    numbers independent architectures of one seed (draw 0 is seeded with the run's seed, draw ``k`` with
    ``seed + 100003 k``), so a comparison can hold several random architectures per seed.
    """

    kind = "random-arch"

    def __init__(self, spread: float = 2.0, draw: int = 0, depths: list[int] | None = None):
        super().__init__(depths)
        if not spread >= 1:
            raise ConfigError(f"random-arch: spread must be >= 1, got {spread}")
        if draw < 0:
            raise ConfigError(f"random-arch: draw must be >= 0, got {draw}")
        self.spread, self.draw = spread, draw

    def widths(self, ctx: MethodContext, seed: nn.Module) -> dict[str, int]:
        return random_widths(seed, ctx.example_inputs, ctx.target_mmacs * 1e6, self.spread,
                             ctx.recipe.seed + 100003 * self.draw)


class BottleneckMethod(_WidthsArch):
    """The known-bad control: ``span`` consecutive widths at relative depth ``position`` squeezed to ``fraction``
    of the rest's scale, the rest widened to the target's MACs (:func:`.scratch.bottleneck_widths`), trained like
    ``scratch``.  A benchmark that cannot tell it from ``scratch`` cannot see an architecture effect."""

    kind = "bottleneck"

    def __init__(self, fraction: float = 0.25, position: float = 0.5, span: int = 1,
                 depths: list[int] | None = None):
        super().__init__(depths)
        if not 0 < fraction < 1:
            raise ConfigError(f"bottleneck: fraction must be in (0, 1), got {fraction}")
        if not 0 <= position <= 1:
            raise ConfigError(f"bottleneck: position must be in [0, 1], got {position}")
        if span < 1:
            raise ConfigError(f"bottleneck: span must be >= 1, got {span}")
        self.fraction, self.position, self.span = fraction, position, span

    def widths(self, ctx: MethodContext, seed: nn.Module) -> dict[str, int]:
        return bottleneck_widths(seed, ctx.example_inputs, ctx.target_mmacs * 1e6, self.fraction, self.position,
                                 self.span)


register_method("random")(_Random)
register_method("firefly")(_Firefly)
register_method("gradmax")(_GradMax)
register_method("vt")(_VarianceTransfer)
register_method("scratch")(ScratchMethod)
register_method("random-arch")(RandomArchMethod)
register_method("bottleneck")(BottleneckMethod)
for _c in CRITERIA:
    register_method(f"prune-{_c}")(partial(PruneMethod, _c))
for _c in ("l1", "taylor", "slim"):
    register_method(f"prune-{_c}-global")(partial(PruneMethod, _c, global_pruning=True))
