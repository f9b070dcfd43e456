"""Architectures trained from scratch at a MAC target: uniform widths (the width multiplier whose MACs match),
random widths (the architecture control) and a bottleneck (the known-bad control)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nas_split.cost import count_macs
from nas_split.surgery.rebuild import resized_sizes, width_groups
from nas_split.surgery.sizes import apply_sizes

__all__ = ["match_width", "scaled_widths", "random_widths", "bottleneck_widths", "log_distance"]


def _closest_scale(macs: Callable[[float], int], target_macs: float, lo: float, hi: float, iters: int,
                   what: str) -> tuple[float, int]:
    """The scale in ``[lo, hi]`` whose MACs (non-decreasing in the scale, in steps) are closest to the target:
    geometric bisection to the first scale at or above it, then the closer of it and the last one below."""
    lo_macs, hi_macs = macs(lo), macs(hi)
    if not lo_macs <= target_macs <= hi_macs:
        raise ValueError(f"target {target_macs / 1e6:.3f} MMACs is outside what {what} {lo:g}..{hi:g} reach "
                         f"({lo_macs / 1e6:.3f}..{hi_macs / 1e6:.3f} MMACs)")
    for _ in range(iters):
        mid = (lo * hi) ** 0.5
        m = macs(mid)
        if m >= target_macs:
            hi, hi_macs = mid, m
        else:
            lo, lo_macs = mid, m
    return (lo, lo_macs) if target_macs - lo_macs < hi_macs - target_macs else (hi, hi_macs)


def match_width(build: Callable[[float], nn.Module], example_inputs: torch.Tensor, target_macs: float,
                lo: float = 0.02, hi: float = 4.0, iters: int = 20) -> tuple[float, int]:
    """The multiplier ``m`` in ``[lo, hi]`` whose ``build(m)`` has MACs closest to ``target_macs``, with its MACs.

    MACs grow with ``m`` in steps (widths are rounded), so bisection finds the first multiplier at or above the
    target and the closer of it and the last one below is returned.
    """
    return _closest_scale(lambda m: count_macs(build(m), example_inputs)[0], target_macs, lo, hi, iters,
                          "width multipliers")


def scaled_widths(seed: nn.Module, example_inputs: torch.Tensor, target_macs: float, factors: dict[str, float],
                  iters: int = 30) -> dict[str, int]:
    """Widths ``max(1, round(s f_l w_l))`` of ``seed``'s independent widths ``w_l``
    (:func:`~nas_split.surgery.rebuild.width_groups`), ``f_l = factors[l]`` (1 where missing), with the one scale
    ``s`` found by bisection (MACs grow with ``s``) so that the MACs are closest to ``target_macs``:
    ``{root layer: width}``.

    Raises:
        ValueError: no scale in ``[1/64, 64]`` reaches the target.
    """
    import copy

    base = width_groups(seed, example_inputs)

    def widths(s: float) -> dict[str, int]:
        return {n: max(1, round(s * factors.get(n, 1.0) * w)) for n, w in base.items()}

    def macs(s: float) -> int:
        m = copy.deepcopy(seed)
        apply_sizes(m, resized_sizes(seed, example_inputs, widths(s)))
        return count_macs(m, example_inputs)[0]

    return widths(_closest_scale(macs, target_macs, 1 / 64, 64.0, iters, "scales of the seed's widths")[0])


def random_widths(seed: nn.Module, example_inputs: torch.Tensor, target_macs: float, spread: float = 2.0,
                  rng_seed: int = 0, iters: int = 30) -> dict[str, int]:
    """Random widths around ``seed``'s profile at ``target_macs``: :func:`scaled_widths` with ``f_l = spread^u_l``,
    ``u_l ~ U[-1, 1]`` (log-uniform in ``[1/spread, spread]``, drawn with
    ``torch.Generator().manual_seed(rng_seed)``)."""
    base = width_groups(seed, example_inputs)
    gen = torch.Generator().manual_seed(rng_seed)
    factors = {n: spread ** float(2 * torch.rand((), generator=gen) - 1) for n in base}
    return scaled_widths(seed, example_inputs, target_macs, factors, iters)


def bottleneck_widths(seed: nn.Module, example_inputs: torch.Tensor, target_macs: float, fraction: float = 0.25,
                      position: float = 0.5, span: int = 1, iters: int = 30) -> dict[str, int]:
    """A known-bad architecture at ``target_macs``: :func:`scaled_widths` with ``span`` consecutive independent
    widths, starting at relative depth ``position`` (0: the first, 1: the last), at ``fraction`` of the others'
    scale (``f = fraction`` there, 1 elsewhere): the rest of the network is widened to spend the MACs the
    bottleneck saves."""
    names = list(width_groups(seed, example_inputs))
    first = min(round(position * (len(names) - 1)), max(len(names) - span, 0))
    factors = {n: fraction for n in names[first:first + span]}
    return scaled_widths(seed, example_inputs, target_macs, factors, iters)


def log_distance(widths: dict[str, int], base: dict[str, int]) -> float:
    """How far ``widths`` are from ``base`` scaled uniformly: the RMS over layers of ``ln(w_l / b_l) − mean``
    (0 for a uniform width multiplier, up to rounding; ``ln spread / √3`` expected for log-uniform factors in
    ``[1/spread, spread]``)."""
    import math

    logs = [math.log(widths[n] / base[n]) for n in base]
    mean = sum(logs) / len(logs)
    return math.sqrt(sum((v - mean) ** 2 for v in logs) / len(logs))
