"""Which neurons to split: a grow ratio with quotas, or the energy-aware linear program.

**Ratio**: candidates sorted by gain ``G`` (most negative first) are taken until their new neurons reach
``ratio x`` the current neurons (per group with ``quotas``); ``only_negative`` keeps only ``G < 0``.

**Energy-aware** (Wang et al. 2019, §2.3 of algorithms.md): with ``cost_i`` the MAC increase of split ``i``, or
its price under a cost model (:mod:`nas_split.cost_models`),

    min_β Σ_i β_i G_i   s.t.   Σ_{i∈g} β_i cost_i ≤ τ_g  for every group g,
                               Σ_{i∈ℓ} β_i new_i ≤ cap_ℓ − width_ℓ  for every capped layer ℓ,   0 ≤ β_i ≤ 1,

solved by ``scipy.optimize.linprog(method="highs")``; splits with ``β_i ≥ threshold`` are kept.  The default
budget ``τ_g = ratio x Σ_{ℓ∈g} width_ℓ x cost_ℓ`` is the cost of growing every layer of the group by ``ratio``.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .schemes import NeuronSplit

__all__ = ["Candidate", "select_ratio", "select_lp", "LPResult"]


@dataclass
class Candidate:
    """A split with its cost and group, for selection."""

    split: NeuronSplit
    cost: float = 0.0
    group: str = "all"

    @property
    def layer(self) -> str:
        return self.split.layer

    @property
    def gain(self) -> float:
        return self.split.gain

    @property
    def new(self) -> int:
        return self.split.new_neurons


def select_ratio(cands: Sequence[Candidate], neurons: Mapping[str, int], ratio: float,
                 only_negative: bool = True, quotas: Mapping[str, float] | None = None,
                 groups: Mapping[str, str] | None = None) -> list[Candidate]:
    """Best candidates until their new neurons reach ``ratio x`` current neurons (per group with ``quotas``).

    Args:
        neurons: current width of every candidate layer.
        quotas: ``{group: ratio}`` overriding ``ratio`` per group; ``groups`` maps layer -> group.
    """
    if ratio < 0:
        raise ValueError(f"grow ratio must be >= 0, got {ratio}")
    groups = groups or {}
    allowance: dict[str, float] = defaultdict(float)
    for layer, width in neurons.items():
        g = groups.get(layer, "all")
        allowance[g] += (quotas or {}).get(g, ratio) * width
    chosen = []
    for cand in sorted(cands, key=lambda c: c.gain):
        if only_negative and not cand.gain < 0:
            break
        g = groups.get(cand.layer, "all")
        if cand.new <= allowance[g] + 1e-9:
            allowance[g] -= cand.new
            chosen.append(cand)
    return chosen


@dataclass
class LPResult:
    """The LP's solution ``beta``, its objective and the budgets used."""

    beta: np.ndarray
    objective: float
    budgets: dict[str, float]


def select_lp(cands: Sequence[Candidate], budgets: Mapping[str, float],
              room: Mapping[str, int] | None = None, threshold: float = 0.99) -> tuple[list[Candidate], LPResult]:
    """Energy-aware selection (see the module docstring); ``room`` is ``cap - width`` per capped layer."""
    from scipy.optimize import linprog

    if not cands:
        return [], LPResult(np.zeros(0), 0.0, dict(budgets))
    gains = np.array([c.gain for c in cands], dtype=float)
    rows, rhs = [], []
    for g, tau in budgets.items():  # each row divided by its budget: costs in µJ or ms stay well above tolerances
        scale = tau if tau > 0 else 1.0
        rows.append([c.cost / scale if c.group == g else 0.0 for c in cands])
        rhs.append(tau / scale)
    for layer, r in (room or {}).items():
        rows.append([float(c.new) if c.layer == layer else 0.0 for c in cands])
        rhs.append(max(0.0, float(r)))
    res = linprog(gains, A_ub=np.array(rows) if rows else None, b_ub=np.array(rhs) if rows else None,
                  bounds=[(0.0, 1.0)] * len(cands), method="highs")
    if res.status != 0:
        raise RuntimeError(f"energy-aware LP failed: {res.message}")
    beta = res.x
    chosen = [c for c, b in zip(cands, beta, strict=True) if b >= threshold]
    return chosen, LPResult(beta, float(res.fun), dict(budgets))
