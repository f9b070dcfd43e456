"""Splitting schemes: S2D's positive split and S3D's signed splits, with their second-order gains.

Splitting a neuron into copies ``(w_i, θ + ε δ_i)`` with ``Σ w_i = 1`` and ``Σ w_i δ_i = 0`` changes the loss
by ``(ε²/2) G + O(ε³)`` with ``G = Σ_i w_i δ_iᵀ S δ_i`` (algorithms §1.1, §3.1).  With unit eigenvectors
``v = v_min``, ``u = v_max`` and the mass budget ``Σ |w_i| ≤ c`` (``c = 1`` is S2D), ``P = (c+1)/2``,
``N = (c-1)/2``:

================  ===========================================================  ======================
scheme            copies (weight, displacement)                                 gain G
================  ===========================================================  ======================
``s2d``           (½, +v), (½, −v)                                             λ_min
``s3d-min``       (P/2, +v), (P/2, −v), (−N, 0)                                 P λ_min
``s3d-max``       (P, 0), (−N/2, +u), (−N/2, −u)                                −N λ_max
``s3d-both``      (P/2, +v), (P/2, −v), (−N/2, +u), (−N/2, −u)                  P λ_min − N λ_max
================  ===========================================================  ======================

S3D picks per neuron the scheme with the most negative gain (``s3d-both`` only when ``max_copies >= 4``).  The
mass budget is the formalisation of algorithms.md §3.2: the exact constraint of the S3D paper is unconfirmed,
so ``c`` is a parameter (default 3, as in ``check_split.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..surgery import SplitScheme

__all__ = ["NeuronSplit", "s2d_split", "s3d_splits", "best_s3d_split"]


@dataclass
class NeuronSplit:
    """A candidate split of one neuron: its scheme and second-order gain ``G`` (more negative is better)."""

    layer: str
    channel: int
    kind: str
    scheme: SplitScheme
    gain: float

    @property
    def new_neurons(self) -> int:
        """Neurons this split adds."""
        return self.scheme.copies - 1

    def predicted_change(self, eps: float) -> float:
        """Predicted loss change ``(ε²/2) G``."""
        return 0.5 * eps * eps * self.gain


def s2d_split(layer: str, channel: int, lam_min: float, v_min: torch.Tensor) -> NeuronSplit:
    """S2D: two copies with weights ½ at ``θ ± ε v_min``; gain ``λ_min``."""
    return NeuronSplit(layer, channel, "s2d", SplitScheme((0.5, 0.5), torch.stack([v_min, -v_min])), float(lam_min))


def s3d_splits(layer: str, channel: int, lam_min: float, v_min: torch.Tensor, lam_max: float,
               v_max: torch.Tensor, c: float = 3.0, max_copies: int = 4) -> list[NeuronSplit]:
    """All signed schemes under mass budget ``c`` (``c = 1`` gives only S2D)."""
    if c < 1:
        raise ValueError(f"the mass budget c must be >= 1, got {c}")
    if c == 1:
        return [s2d_split(layer, channel, lam_min, v_min)]
    p, n = (c + 1) / 2, (c - 1) / 2
    zero = torch.zeros_like(v_min)
    out = [
        NeuronSplit(layer, channel, "s3d-min", SplitScheme((p / 2, p / 2, -n), torch.stack([v_min, -v_min, zero])),
                    float(p * lam_min)),
        NeuronSplit(layer, channel, "s3d-max", SplitScheme((p, -n / 2, -n / 2), torch.stack([zero, v_max, -v_max])),
                    float(-n * lam_max)),
    ]
    if max_copies >= 4:
        out.append(NeuronSplit(layer, channel, "s3d-both",
                               SplitScheme((p / 2, p / 2, -n / 2, -n / 2), torch.stack([v_min, -v_min, v_max, -v_max])),
                               float(p * lam_min - n * lam_max)))
    return out


def best_s3d_split(layer: str, channel: int, lam_min: float, v_min: torch.Tensor, lam_max: float,
                   v_max: torch.Tensor, c: float = 3.0, max_copies: int = 4) -> NeuronSplit:
    """The signed scheme with the most negative gain (ties: fewer copies)."""
    cands = s3d_splits(layer, channel, lam_min, v_min, lam_max, v_max, c, max_copies)
    return min(cands, key=lambda s: (s.gain, s.scheme.copies))
