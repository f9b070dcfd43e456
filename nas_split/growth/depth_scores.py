"""Firefly's depth growth (Wu et al., NeurIPS 2020): new blocks scored by their gate's first-order effect on the
loss, so that they can compete with width candidates under one MAC budget.

At each site ``k`` (:func:`nas_split.growth.depth.insertion_sites`) a fresh block ``B_k`` (built as
:func:`nas_split.surgery.blocks.new_modules` builds it; its norms on batch statistics) is set as insertion sets
it (:func:`nas_split.growth.depth.close_block`: the last norm zero for a block with a skip, the Net2DeeperNet
identity on the first batch otherwise), so that ``B_k(y_k) = y_k`` at the start, as Firefly grows new neurons
from zero, and attached to the output ``y_k`` of the child it follows, behind a gate ``s_k = 0``::

    y_k  ->  y_k + s_k · (B_k(y_k) − y_k)

For a block with a skip ``B_k(y) − y`` is its residual branch (output ``= x + s·branch(x)``); for a block or layer
without one the gate blends the fresh block in from the identity.  At ``s = 0`` the network is unchanged.

With the network frozen (eval mode), every block's parameters ``θ_k`` are optimised for ``steps`` batches with
Firefly's published optimiser (RMSprop, lr 1e-3, momentum 0.1, α 0.9, penalty 1e-2), on Firefly's objective in
the limit of a small step, the first-order change of the loss::

    J(θ) = Σ_k E[⟨∂L/∂y_k, B_k(y_k) − y_k⟩] + penalty · Σ_k ‖θ_k − θ_k⁰‖²

(at ``s = 0`` neither ``y_k`` nor ``∂L/∂y_k`` depends on any ``θ``, so ``∂J/∂θ_k`` runs through ``B_k`` alone; the
penalty bounds the step, the objective being linear in the last norm's affine parameters).  From ``B_k(y_k) =
y_k`` the optimisation moves each block along a descent direction of the loss, so a site scores below 0 unless
the loss cannot decrease through it to first order.  (A block left at timm's random initialisation starts far
from ``y_k`` and, on Fashion-MNIST, every one still scored above 0 after the 20 steps: none would ever be
inserted.)  Each candidate is then scored by ``score_k = E[∂L/∂s_k]`` at ``s = 0`` over the same batches
(negative: opening the block lowers the loss), and costs the MACs its block adds per sample.

:func:`select_within_macs` ranks negative-score width and depth candidates by gain per added MAC (``−score /
MACs``) and cuts them at the longest prefix within a budget
(:func:`nas_split.growth.depth.mixed_prefix_within_macs`).  :func:`apply_depth` inserts chosen blocks keeping the
function (:func:`nas_split.growth.depth.deepen`): a block with a skip as optimised, its last norm zeroed (``s = 0``
folded in); a block or layer without one as the Net2DeeperNet identity — its optimised ``θ`` only ranked the site,
since no function-preserving insertion carries it.

:func:`grow_depth` is one round's depth step of a growth method (``growth.depth``): score, choose at most
``max_blocks`` blocks, insert them, and give their parameters to the optimizer; the method's width step then grows
the deepened network within the rest of the round's MAC cap.  How the blocks are chosen depends on what the width
candidates are scored with.  Firefly's width scores are first-order gate derivatives too, so with them
(``width_scores``) blocks and channels share one ranking by gain per added MAC (:func:`select_within_macs`) and
the blocks in the prefix that fits the cap are inserted.  Splitting's gains are second order (``ε²λ_min/2`` per
split) and on another scale; the splitting analysis gives no cheap second-order score of a new block (a block is
not a neuron with a splitting matrix), so there the blocks with a negative score are ranked by ``−score / MACs``
and taken, best first, while the model with them stays within the cap.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..cost import count_macs
from ..distributed import all_reduce_sum, batch_share
from ..numerics import evaluating, full_precision, like_model, model_device
from ..surgery import CouplingGraph
from ..surgery.blocks import new_modules, renamer
from ..surgery.optim import add_new_params
from .channel_cost import channel_costs
from .depth import (
    Site,
    block_inputs,
    close_block,
    deepen,
    in_insertion_order,
    insertion_sites,
    mixed_prefix_within_macs,
)

__all__ = ["DepthCandidate", "DepthRound", "depth_candidates", "select_within_macs", "apply_depth", "grow_depth"]

WidthKey = tuple[str, str, int]  # (layer, "split" | "new", index), as baselines.firefly scores them


@dataclass
class DepthCandidate:
    """A scored block: ``modules`` (optimised, the gate open) go after ``site``; ``score = E[∂L/∂s]`` at ``s = 0``;
    ``macs`` added per sample."""

    site: Site
    score: float
    macs: int
    modules: list[nn.Module]


class _Gates:
    """Forward hooks attaching each site's block behind its gate (see the module docstring)."""

    def __init__(self, model: nn.Module, blocks: Mapping[Site, nn.Module], dtype: torch.dtype):
        self.blocks = blocks
        device = model_device(model)
        self.s = {site: torch.zeros((), device=device, dtype=dtype, requires_grad=True) for site in blocks}
        self.y: dict[Site, torch.Tensor] = {}
        self.branch: dict[Site, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.handles = [modules[site.child].register_forward_hook(self._attach(site)) for site in blocks]

    def _attach(self, site: Site):
        def fn(_m, _inputs, y):
            self.y[site], self.branch[site] = y, self.blocks[site](y) - y
            return y + self.s[site] * self.branch[site]
        return fn

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@full_precision()
def depth_candidates(model: nn.Module, loader: Iterable, where: Sequence[Site] | None = None, steps: int = 20,
                     lr: float = 1e-3, penalty: float = 1e-2, loss_fn: Callable = F.cross_entropy,
                     seed: int = 0) -> list[DepthCandidate]:
    """Optimise a fresh block at each site (default: every site :func:`~nas_split.growth.depth.deepen` can take) on
    the first ``steps`` batches of ``loader``, then score it on the same batches (see the module docstring).

    The blocks are drawn under ``torch.manual_seed(seed)`` in a forked random state, so the caller's random
    streams do not move; ``model`` is left as it was (weights, statistics, modes)."""
    where = list(insertion_sites(model) if where is None else where)
    if not where:
        return []
    device = model_device(model)
    # inputs that need a gradient, so that every y_k has one when the caller froze the model
    batches = [(like_model(model, x).detach().requires_grad_(), y.to(device))
               for x, y in itertools.islice(loader, steps)]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        blocks = {s: nn.Sequential(*new_modules(model, s)).train() for s in where}
    inputs = block_inputs(model, where, batches[0][0])
    with torch.no_grad():  # start where insertion starts: B_k(y_k) = y_k (Firefly grows from zero)
        for s, b in blocks.items():
            close_block(list(b), inputs[s])
    params = [p for b in blocks.values() for p in b.parameters()]
    start = [p.detach().clone() for p in params]
    dtype = next(model.parameters()).dtype
    gates = _Gates(model, blocks, dtype)
    opt = torch.optim.RMSprop(params, lr=lr, momentum=0.1, alpha=0.9)
    scores = dict.fromkeys(where, 0.0)
    try:
        with evaluating(model):
            for x, y in batches:
                loss = loss_fn(model(x), y)
                grads_y = torch.autograd.grad(loss, [gates.y[s] for s in where], retain_graph=True)
                objective = sum((g * gates.branch[s]).sum() for s, g in zip(where, grads_y, strict=True))
                objective = objective + penalty * sum((p - p0).pow(2).sum() for p, p0 in zip(params, start,
                                                                                             strict=True))
                grads = torch.autograd.grad(objective, params)
                share = batch_share(len(y), device)  # the whole batch's gradient: shards weighted (1 alone)
                for p, g in zip(params, grads, strict=True):
                    p.grad = all_reduce_sum(g * share)
                opt.step()
            for x, y in batches:
                ds = torch.autograd.grad(loss_fn(model(x), y), [gates.s[s] for s in where])
                share = batch_share(len(y), device)
                for s, d in zip(where, ds, strict=True):
                    scores[s] += float(all_reduce_sum(d * share)) / len(batches)
    finally:
        gates.close()
    return [DepthCandidate(s, scores[s], count_macs(blocks[s], gates.y[s].detach())[0], list(blocks[s]))
            for s in where]


def select_within_macs(model: nn.Module, example_inputs: torch.Tensor, width_scores: Mapping[WidthKey, float],
                       depth: Sequence[DepthCandidate], max_macs: float) -> list[WidthKey | DepthCandidate]:
    """The width candidates (``baselines.firefly`` scores, one new channel of their layer each) and depth
    candidates with a negative score, by gain per added MAC (``−score / MACs``; a channel's MACs from
    :func:`~nas_split.growth.channel_cost.channel_costs`), best first, cut at the longest prefix whose growth keeps
    the model at or under ``max_macs`` MACs (:func:`~nas_split.growth.depth.mixed_prefix_within_macs`)."""
    layers = {key[0] for key, v in width_scores.items() if v < 0}
    graph = CouplingGraph(model, example_inputs)
    costs = channel_costs(model, example_inputs, {layer: graph.group(layer) for layer in layers})
    ranked: list[tuple[float, WidthKey | DepthCandidate]] = [(-v / costs[key[0]].macs, key)
                                                             for key, v in width_scores.items() if v < 0]
    ranked += [(-c.score / c.macs, c) for c in depth if c.score < 0]
    ranked.sort(key=lambda r: -r[0])
    items = [c.site if isinstance(c, DepthCandidate) else (c[0], 1) for _, c in ranked]
    return [c for _, c in ranked[:mixed_prefix_within_macs(model, example_inputs, items, max_macs)]]


def apply_depth(model: nn.Module, chosen: Iterable[DepthCandidate], batch: torch.Tensor) -> list[str]:
    """Insert the chosen candidates' blocks at their sites (sites of ``model`` as scored), keeping the function
    (:func:`~nas_split.growth.depth.deepen`; ``batch`` sets the norms of blocks without a skip); returns the names
    of the new modules.  The candidates' modules move into ``model``."""
    by_site = {c.site: c for c in chosen}
    inserted = []
    for site in in_insertion_order(by_site):
        deepen(model, site, batch, modules=by_site[site].modules)
        inserted += by_site[site].modules
    return [n for n, m in model.named_modules() if any(m is x for x in inserted)]


@dataclass
class DepthRound:
    """What one :func:`grow_depth` did: the new modules' names, the chosen sites (``"container:after"``), every
    scored site's score, and ``rename``, which maps a module name of the model before the step to its name after
    (later blocks of a deepened stage move up)."""

    blocks: list[str]
    sites: list[str]
    scores: dict[str, float]
    rename: Callable[[str], str]

    def to_dict(self) -> dict:
        """JSON-ready summary (a stage record's ``growth["depth"]``)."""
        return {"blocks": self.blocks, "sites": self.sites, "scores": self.scores}


def grow_depth(model: nn.Module, example_inputs: torch.Tensor, loader: Iterable, max_blocks: int,
               max_macs: float | None = None, width_scores: Mapping[WidthKey, float] | None = None,
               optimizer: torch.optim.Optimizer | None = None, steps: int = 20, lr: float = 1e-3,
               penalty: float = 1e-2, seed: int = 0, loss_fn: Callable = F.cross_entropy) -> DepthRound:
    """One round's depth step (see the module docstring): score a block at every site on the first ``steps``
    batches of ``loader``, choose at most ``max_blocks`` with a negative score (with ``width_scores``: those in
    the prefix of the mixed ranking that fits ``max_macs``; otherwise by gain per MAC while the model stays
    within ``max_macs``), insert them keeping the function (the first batch sets the norms of blocks without a
    skip) and add their parameters to ``optimizer``."""
    batches = list(itertools.islice(loader, steps))
    cands = depth_candidates(model, batches, steps=steps, lr=lr, penalty=penalty, loss_fn=loss_fn, seed=seed)
    scores = {f"{c.site.container}:{c.site.after}": c.score for c in cands}
    if width_scores is not None and max_macs is not None:
        mixed = select_within_macs(model, example_inputs, width_scores, cands, max_macs)
        chosen = [c for c in mixed if isinstance(c, DepthCandidate)][:max_blocks]
    else:
        ranked = sorted((c for c in cands if c.score < 0), key=lambda c: c.score / c.macs)[:max_blocks]
        k = len(ranked) if max_macs is None else \
            mixed_prefix_within_macs(model, example_inputs, [c.site for c in ranked], max_macs)
        chosen = ranked[:k]
    rename = renamer(model, [c.site for c in chosen])
    names = apply_depth(model, chosen, batches[0][0]) if chosen else []
    if optimizer is not None and chosen:
        add_new_params(optimizer, model, [p for c in chosen for m in c.modules for p in m.parameters()])
    return DepthRound(names, [f"{c.site.container}:{c.site.after}" for c in chosen], scores, rename)
