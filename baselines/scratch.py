"""Uniform-width baseline: the width multiplier whose MACs match a target, trained from scratch."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nas_split.cost import count_macs

__all__ = ["match_width"]


def match_width(build: Callable[[float], nn.Module], example_inputs: torch.Tensor, target_macs: float,
                lo: float = 0.02, hi: float = 4.0, iters: int = 20) -> tuple[float, int]:
    """The multiplier ``m`` in ``[lo, hi]`` whose ``build(m)`` has MACs closest to ``target_macs``.

    MACs grow with ``m`` in steps (widths are rounded), so bisection finds the first multiplier at or above the
    target and the closer of it and the last one below is returned with its MACs.
    """
    def macs(m: float) -> int:
        return count_macs(build(m), example_inputs)[0]

    lo_macs, hi_macs = macs(lo), macs(hi)
    if not lo_macs <= target_macs <= hi_macs:
        raise ValueError(f"target {target_macs / 1e6:.3f} MMACs is outside what width multipliers {lo}..{hi} "
                         f"reach ({lo_macs / 1e6:.3f}..{hi_macs / 1e6:.3f} MMACs)")
    for _ in range(iters):
        mid = (lo * hi) ** 0.5
        m = macs(mid)
        if m >= target_macs:
            hi, hi_macs = mid, m
        else:
            lo, lo_macs = mid, m
    return (lo, lo_macs) if target_macs - lo_macs < hi_macs - target_macs else (hi, hi_macs)
