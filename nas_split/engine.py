"""The one growth loop: a seed stage, then rounds of grow + train on one MAC schedule, with one meaning of a
budget everywhere (``nas-split grow``, every growth method of ``run`` / ``compare``, the NNI strategy).

**The schedule.**  With a MAC target ``T`` (``target_mmacs``, ``growth.target_mmacs``) round ``r`` of ``R`` may
reach ``M_0 (T / M_0)^{r/R}`` MACs (:func:`round_cap`), ``M_0`` the seed's: every round adds the same factor, the
last lands on the target, and a grown model trains as many epochs as the baselines it is compared with.  The
method chooses *which* neurons; the schedule sets *how many*.  Without a target each round grows by the method's
own ratio.  The rounds stop early once the target (or an energy budget, ``budget_energy_uj``) is reached.
:func:`next_stage` is that schedule, stage by stage; both loops follow it: :func:`grow_rounds` in this process, and
the NNI strategy (:class:`nas_split.nni.SplittingDescent`), which submits one stage at a time as an NNI model.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import torch
from torch import nn

from .cost import PassCounter
from .distributed import ShardedBatches, summed
from .errors import ConfigError
from .stages import StageRunner

__all__ = ["GrowStep", "round_cap", "check_target", "reached", "next_stage", "grow_rounds", "grow_step"]


class GrowStep(Protocol):
    """What the engine needs of a growth method (:class:`nas_split.methods.GrowthMethod` is one)."""

    def grow(self, ctx: StageRunner, model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer | None,
             stage: int, max_macs: float | None) -> dict:
        """Grow ``model`` in place (at most to ``max_macs``); a JSON-ready summary."""


def round_cap(seed_macs: float, target_macs: float | None, r: int, rounds: int) -> float | None:
    """MACs round ``r`` of ``rounds`` may reach: ``M_0 (T / M_0)^{r/R}`` (``None`` without a target)."""
    return None if target_macs is None else seed_macs * (target_macs / seed_macs) ** (r / rounds)


def check_target(name: str, seed_macs: float, target_mmacs: float | None, rounds: int,
                 max_round_factor: float) -> None:
    """Refuse a MAC target at or below the seed, or beyond what ``rounds`` rounds can reach."""
    if target_mmacs is None:
        return
    if target_mmacs * 1e6 <= seed_macs:
        raise ConfigError(f"{name}: MAC target {target_mmacs} MMACs is not above the seed's "
                          f"{seed_macs / 1e6:.3f} MMACs")
    reach = seed_macs * max_round_factor ** rounds
    if target_mmacs * 1e6 > reach:
        raise ConfigError(f"{name}: MAC target {target_mmacs} MMACs is out of reach of {rounds} round(s) from the "
                          f"seed's {seed_macs / 1e6:.3f} MMACs (at most {reach / 1e6:.3f}); add rounds or widen "
                          "the seed")


def reached(cost: dict, target_mmacs: float | None, budget_energy_uj: float | None = None) -> bool:
    """Whether a stage's recorded ``cost`` is at the MAC target or the energy budget."""
    return (target_mmacs is not None and cost["mmacs"] >= target_mmacs) or \
        (budget_energy_uj is not None and cost["energy_uj_est"] >= budget_energy_uj)


def next_stage(costs: Sequence[Mapping], rounds: int, target_mmacs: float | None = None,
               budget_energy_uj: float | None = None) -> tuple[int, float | None] | None:
    """The stage that follows the stages recorded in ``costs`` (the seed's first; each a mapping with ``macs``,
    ``mmacs`` and ``energy_uj_est``, as a stage record's ``cost`` or an NNI stage metric holds them):
    ``(0, None)`` for the seed stage, ``(r, cap)`` for growth round ``r`` of ``rounds`` with its MAC cap
    (:func:`round_cap`), or ``None`` when the schedule is done (``rounds`` rounds, or the target / energy budget
    reached)."""
    if not costs:
        return 0, None
    r = len(costs)
    if r > rounds or reached(costs[-1], target_mmacs, budget_energy_uj):
        return None
    return r, round_cap(costs[0]["macs"], None if target_mmacs is None else target_mmacs * 1e6, r, rounds)


def grow_rounds(runner: StageRunner, model: nn.Module, method: GrowStep, *, seed_epochs: int, epochs: int,
                rounds: int, target_mmacs: float | None = None, budget_energy_uj: float | None = None,
                carry_optimizer: bool = True, optimizer: torch.optim.Optimizer | None = None,
                on_stage: Callable[[int, nn.Module, torch.optim.Optimizer | None], None] = lambda *a: None
                ) -> torch.optim.Optimizer | None:
    """Train the seed (unless ``runner.records`` already holds stages: a resumed run), then grow and train round by
    round until ``rounds`` or the target (:func:`next_stage`); ``on_stage(k, model, optimizer)`` after every stage
    (checkpoints).

    Stage ``k`` draws its data with ``runner.loaders(k)`` (every random source reseeded from ``(seed, k)``), so a
    resumed run repeats the choices of an uninterrupted one.  Under several processes each analyses its rows of
    every global batch (:mod:`nas_split.distributed`).  The passes each growth step makes through ``model``
    are recorded as the next stage's ``analysis_macs`` (at the MACs before the growth,
    :class:`~nas_split.cost.PassCounter`), with its ``analysis_seconds`` (the method's own figure, or the wall time
    of the whole step for a method that gives none).  Returns the last optimizer.
    """
    while (step := next_stage([rec.cost for rec in runner.records], rounds, target_mmacs,
                              budget_energy_uj)) is not None:
        r, cap = step
        if r == 0:
            optimizer = runner.stage(model, "seed", seed_epochs)
        else:
            if not carry_optimizer:
                optimizer = None
            extra = grow_step(runner, model, method, r, cap, optimizer, runner.records[-1].macs)
            optimizer = runner.stage(model, "round", epochs, optimizer, **extra)
        on_stage(r, model, optimizer)
    return optimizer


def grow_step(runner: StageRunner, model: nn.Module, method: GrowStep, stage: int, cap: float | None,
              optimizer: torch.optim.Optimizer | None, macs_before: float) -> dict:
    """The growth before stage ``stage``: ``method`` grows ``model`` (to at most ``cap`` MACs) on this process's
    rows of the stage's training batches; returns the stage record's ``growth``, ``analysis_seconds`` and
    ``analysis_macs`` (the passes through ``model``, summed over processes, at ``macs_before`` MACs)."""
    train, _, _ = runner.loaders(stage)
    t0 = time.perf_counter()
    with PassCounter(model) as passes:
        info = method.grow(runner, model, ShardedBatches(train), optimizer, stage, cap)
    return {"growth": info, "analysis_seconds": info.get("analysis_seconds", time.perf_counter() - t0),
            "analysis_macs": summed(passes.macs(macs_before))}

