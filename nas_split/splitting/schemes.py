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

S2D's two copies are also within every budget (``Σ|w_i| = 1 ≤ c``), so S3D chooses among all four.  Which one, and
how candidates are ranked, is ``rank``:

* ``"neuron"`` (default): the most negative gain *per added neuron*, ``G / (copies − 1)``.  Under a MAC (or
  neuron) budget this is the criterion that matters: a 4-copy split adds three neurons, so it must lower the loss
  three times as much as a 2-copy split to be worth its cost.
* ``"total"``: the most negative total gain ``G`` (the rule of earlier versions): with ``c > 1`` ``s3d-both``
  then nearly always wins, spending the budget on few neurons.

:attr:`NeuronSplit.score` holds the ranking value, which selection sorts by.  The
mass budget formalises S3D's constraint on the copies (Wu et al. 2020, §3): its exact form in the paper is unconfirmed,
so ``c`` is a parameter (default 3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..surgery import SplitScheme

__all__ = ["RANKS", "NeuronSplit", "s2d_split", "s3d_splits", "best_s3d_split"]

#: How splits are ranked: by total gain ``G`` or by ``G`` per added neuron.
RANKS = ("neuron", "total")


@dataclass
class NeuronSplit:
    """A candidate split of one neuron: its scheme and second-order gain ``G`` (more negative is better).

    ``rank`` says what :attr:`score`, the value selection sorts by, is: ``G`` per added neuron (``"neuron"``) or
    ``G`` itself (``"total"``); both agree for two-copy splits."""

    layer: str
    channel: int
    kind: str
    scheme: SplitScheme
    gain: float
    rank: str = "neuron"

    @property
    def score(self) -> float:
        """The ranking value: ``G / new_neurons`` or ``G`` (see :attr:`rank`); more negative is better."""
        return self.gain / self.new_neurons if self.rank == "neuron" else self.gain

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
               v_max: torch.Tensor, c: float = 3.0, max_copies: int = 4, rank: str = "neuron") -> list[NeuronSplit]:
    """S2D's split and every signed scheme under mass budget ``c`` (``c = 1`` gives only S2D), ranked by ``rank``."""
    if c < 1:
        raise ValueError(f"the mass budget c must be >= 1, got {c}")
    if rank not in RANKS:
        raise ValueError(f"rank must be one of {', '.join(RANKS)}, got {rank!r}")
    two = s2d_split(layer, channel, lam_min, v_min)
    two.rank = rank
    if c == 1:
        return [two]
    p, n = (c + 1) / 2, (c - 1) / 2
    zero = torch.zeros_like(v_min)
    out = [
        NeuronSplit(layer, channel, "s3d-min", SplitScheme((p / 2, p / 2, -n), torch.stack([v_min, -v_min, zero])),
                    float(p * lam_min)),
        NeuronSplit(layer, channel, "s3d-max", SplitScheme((p, -n / 2, -n / 2), torch.stack([zero, v_max, -v_max])),
                    float(-n * lam_max)),
    ]
    for s in out:
        s.rank = rank
    if max_copies >= 4:
        out.append(NeuronSplit(layer, channel, "s3d-both",
                               SplitScheme((p / 2, p / 2, -n / 2, -n / 2), torch.stack([v_min, -v_min, v_max, -v_max])),
                               float(p * lam_min - n * lam_max), rank))
    return [two, *out]


def best_s3d_split(layer: str, channel: int, lam_min: float, v_min: torch.Tensor, lam_max: float,
                   v_max: torch.Tensor, c: float = 3.0, max_copies: int = 4, rank: str = "neuron") -> NeuronSplit:
    """The scheme with the most negative :attr:`~NeuronSplit.score` under ``rank`` (ties: fewer copies)."""
    cands = s3d_splits(layer, channel, lam_min, v_min, lam_max, v_max, c, max_copies, rank)
    return min(cands, key=lambda s: (s.score, s.scheme.copies))
