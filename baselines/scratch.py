"""Architectures trained from scratch at a MAC target: uniform widths (the width multiplier whose MACs match)
and random widths (the architecture control)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nas_split.cost import count_macs
from nas_split.surgery.rebuild import resized_sizes, width_groups
from nas_split.surgery.sizes import apply_sizes

__all__ = ["match_width", "random_widths"]


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


def random_widths(seed: nn.Module, example_inputs: torch.Tensor, target_macs: float, spread: float = 2.0,
                  rng_seed: int = 0, iters: int = 30) -> dict[str, int]:
    """Random widths around ``seed``'s profile at ``target_macs``: ``{root layer: width}``.

    Each independent width ``w_l`` of ``seed`` (:func:`~nas_split.surgery.rebuild.width_groups`) becomes
    ``max(1, round(s f_l w_l))`` with ``f_l = spread^u_l``, ``u_l ~ U[-1, 1]`` (log-uniform in
    ``[1/spread, spread]``, drawn with ``torch.Generator().manual_seed(rng_seed)``), and the one scale ``s`` found
    by bisection (MACs grow with ``s``) so that the MACs are closest to ``target_macs``.

    Raises:
        ValueError: no scale in ``[1/64, 64]`` reaches the target.
    """
    import copy

    base = width_groups(seed, example_inputs)
    gen = torch.Generator().manual_seed(rng_seed)
    factors = {n: spread ** float(2 * torch.rand((), generator=gen) - 1) for n in base}

    def widths(s: float) -> dict[str, int]:
        return {n: max(1, round(s * factors[n] * w)) for n, w in base.items()}

    def macs(s: float) -> int:
        m = copy.deepcopy(seed)
        apply_sizes(m, resized_sizes(seed, example_inputs, widths(s)))
        return count_macs(m, example_inputs)[0]

    return widths(_closest_scale(macs, target_macs, 1 / 64, 64.0, iters, "scales of the seed's widths")[0])
