"""Which neurons to split: a grow ratio with quotas, or the energy-aware linear program; and the ablation arms.

**Ratio**: candidates sorted by their score (gain ``G``, or ``G`` per added neuron for S3D:
:attr:`~nas_split.splitting.schemes.NeuronSplit.score`, most negative first) are taken until their new neurons
reach ``ratio x`` the current neurons (per group with ``quotas``); ``only_negative`` keeps only ``G < 0``.

**Arms** (:data:`ARMS`, the ablation of what splitting's choice adds, README "Benchmark"): ``top`` is the rule
above; ``reverse`` takes candidates in the reverse order (least promising first); ``layer-random`` keeps how many
neurons ``top`` takes in each layer but draws them at random within the layer (:func:`within_layer_random`);
``random-direction`` keeps ``top``'s neurons but splits each along a random unit direction instead of
``v_min`` (:func:`random_directions`).

**Energy-aware** (Wang et al. 2019, "Energy-Aware Neural Architecture Optimization with Fast Splitting Steepest
Descent"): with ``cost_i`` the MAC increase of split ``i``, or
its price under a cost model (:mod:`nas_split.cost`),

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
import torch

from ..surgery import SplitScheme
from .schemes import NeuronSplit

__all__ = ["ARMS", "Candidate", "select_ratio", "select_lp", "LPResult", "within_layer_random",
           "random_directions"]

#: Selection arms: the method's own choice and the three ablations of it.
ARMS = ("top", "reverse", "layer-random", "random-direction")


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
                 groups: Mapping[str, str] | None = None, reverse: bool = False) -> list[Candidate]:
    """Best candidates (worst first with ``reverse``) until their new neurons reach ``ratio x`` current neurons
    (per group with ``quotas``).

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
    for cand in sorted(cands, key=lambda c: c.split.score, reverse=reverse):
        if only_negative and not cand.gain < 0:
            continue
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


def within_layer_random(picked: Sequence[NeuronSplit], candidates: Sequence[NeuronSplit],
                        generator: torch.Generator) -> list[NeuronSplit]:
    """``picked``'s count of splits per layer, each layer's drawn uniformly without replacement from that layer's
    ``candidates`` (every neuron's split, with its own scheme): the allocation of ``picked`` without its choice of
    neurons.  With one scheme per layer (S2D) the new neurons, hence the MACs, per layer are ``picked``'s."""
    counts: dict[str, int] = defaultdict(int)
    for s in picked:
        counts[s.layer] += 1
    out = []
    for layer, k in counts.items():
        pool = [s for s in candidates if s.layer == layer]
        out += [pool[i] for i in torch.randperm(len(pool), generator=generator)[:k].tolist()]
    return out


def random_directions(picked: Sequence[NeuronSplit], generator: torch.Generator) -> list[NeuronSplit]:
    """``picked``'s neurons and copy weights, each split's displacements rotated into a random subspace: with
    ``B`` an orthonormal basis of the scheme's directions (``v_min``, and ``v_max`` for S3D) and ``C`` each
    displacement's coordinates in it, the new displacements are ``C Qᵀ`` for a random orthonormal ``Q`` (QR of a
    Gaussian matrix drawn from ``generator``).  So ``±v`` becomes ``±r``, zero stays zero, norms and the
    pairing of the copies are kept, and only the direction is random.  Its gain is unknown, recorded as 0."""
    out = []
    for s in picked:
        d = s.scheme.directions
        flat = d.flatten(1).double().cpu()
        _, sv, vh = torch.linalg.svd(flat, full_matrices=False)
        k = int((sv > 1e-6 * sv.max().clamp_min(1e-30)).sum())
        basis = vh[:k]  # (k, n)
        q, _ = torch.linalg.qr(torch.randn(flat.shape[1], k, generator=generator, dtype=torch.float64))
        new = (flat @ basis.T @ q.T).to(d.dtype).to(d.device).view_as(d)
        out.append(NeuronSplit(s.layer, s.channel, f"{s.kind}+random-direction", SplitScheme(s.scheme.weights, new),
                               0.0, s.rank))
    return out
