"""Firefly neural architecture descent (Wu et al., NeurIPS 2020): split existing neurons and add new ones.

For every splittable layer ℓ (``C`` neurons, activation σ, folded norm ``u = a z + b``) the candidate network has

* a split candidate per neuron ``c``: ``σ_c → ½ σ(u_c + s_c a_c (D_c·p)) + ½ σ(u_c − s_c a_c (D_c·p))``;
* ``K`` new neurons ``j`` (real extra channels of a widened copy, identity norms and depthwise filters): fan-in
  ``A_j`` gated by ``s_j``, fan-out ``B_j`` into the existing output channels of the consumer.

With the network frozen, ``D, A, B`` are optimised for ``steps`` batches (RMSprop, lr 1e-3, momentum 0.1,
α 0.9, penalty 1e-2 (‖D‖² + 1e-2 ‖A‖²), the published settings).  The first-order sensitivity
``score = E[∂L/∂s]`` at ``s = 1`` ranks all candidates; the ``k = ⌊grow_ratio x neurons⌋`` most negative are
kept (:func:`select_most_negative`) and applied through the surgery: splits with directions ``±D_c``
(``eps`` scales them; 1 = the published unscaled ``v``), new neurons with fan-in ``eps·A`` and fan-out ``B``.
Unlike the published MobileNet code, new neurons get identity depthwise filters, not zero ones.  Splits are
averaged right at the activation, as in the published code: exact for a linear consumer, an approximation when a
depthwise conv sits in between.
"""
from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from nas_split.distributed import all_reduce_sum, batch_share, world_size
from nas_split.growth.channel_cost import prefix_within_macs
from nas_split.growth.neurons import Neuron, splittable_layers
from nas_split.numerics import full_precision, like_model, model_device
from nas_split.surgery import CouplingGraph, NewChannels, SplitScheme, add_channels, split

from .norm_init import calibrate_new_norms

__all__ = ["FireflyCandidates", "firefly_candidates", "candidate_scores", "select_most_negative", "firefly_grow",
           "FireflyReport"]


@dataclass
class FireflyCandidates:
    """Optimised perturbations and scores of one layer's candidates (``K`` new neurons)."""

    layer: str
    split_dirs: torch.Tensor          # D: (C, *fan_in)
    new_fan_in: torch.Tensor          # A: (K, *fan_in)
    new_fan_out: dict[str, torch.Tensor]  # B: {consumer: (K, *column)} over the consumer's existing rows
    split_scores: torch.Tensor        # (C,)
    new_scores: torch.Tensor          # (K,)


@dataclass
class FireflyReport:
    """Which candidates were applied."""

    splits: dict[str, list[int]]
    new: dict[str, int]

    @property
    def new_neurons(self) -> int:
        return sum(len(v) for v in self.splits.values()) + sum(self.new.values())


def select_most_negative(scores: dict[tuple[str, str, int], float], k: int) -> list[tuple[str, str, int]]:
    """The ``k`` candidates with the most negative scores (ties broken by key), exactly ``min(k, n)`` of them."""
    return sorted(scores, key=lambda key: (scores[key], key))[:max(0, k)]


def _lin(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, w)
    conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
    return conv(x, w, None, layer.stride, layer.padding, layer.dilation)


class _Candidate:
    """Hooks turning a widened copy of the model into the gated candidate network."""

    def __init__(self, cand: nn.Module, neurons: dict[str, Neuron], names: dict[nn.Module, str],
                 widths: dict[str, int], k: int, orig_in: dict[str, torch.Tensor]):
        self.cand, self.k, self.widths, self.orig_in = cand, k, widths, orig_in
        mods = dict(cand.named_modules())
        self.nr = {n: Neuron(n, mods[n], mods[names[nr.norm]] if nr.norm is not None else None, mods[names[nr.act]],
                             nr.kind) for n, nr in neurons.items()}
        self.params: dict[str, torch.Tensor] = {}
        self.gates: dict[str, torch.Tensor] = {}
        self.x: dict[str, torch.Tensor] = {}
        self.u: dict[str, torch.Tensor] = {}
        self.handles = []
        for n, nr in self.nr.items():
            self.handles += [nr.layer.register_forward_hook(self._grab_x(n)),
                             nr.act.register_forward_pre_hook(self._grab_u(n)),
                             nr.act.register_forward_hook(self._replace(n))]

    def _grab_x(self, n):
        def fn(_m, inputs, _out):
            x = inputs[0]
            idx = self.orig_in.get(n)
            self.x[n] = x if idx is None else x.index_select(-1 if isinstance(self.nr[n].layer, nn.Linear) else 1,
                                                             idx)
        return fn

    def _grab_u(self, n):
        def fn(_m, inputs):
            self.u[n] = inputs[0].clone()
        return fn

    def _replace(self, n):
        def fn(act, _inputs, _out):
            nr, u, x, c = self.nr[n], self.u[n], self.x[n], self.widths[n]
            a, _ = nr.fold()
            ch = -1 if isinstance(nr.layer, nn.Linear) else 1
            shape = [1] * u.dim()
            shape[ch] = -1
            s_split, s_new = self.gates[n][:c], self.gates[n][c:]
            d = _lin(nr.layer, x, self.params[f"{n}.D"]) * (s_split * a[:c]).view(shape)
            new = _lin(nr.layer, x, self.params[f"{n}.A"]) * (s_new * a[c:]).view(shape)
            u_old, u_new = u.narrow(ch, 0, c), u.narrow(ch, c, self.k)
            out_old = 0.5 * (act.__class__.forward(act, u_old + d) + act.__class__.forward(act, u_old - d))
            return torch.cat([out_old, act.__class__.forward(act, u_new + new)], dim=ch)
        return fn

    def close(self):
        for h in self.handles:
            h.remove()


@full_precision()
def firefly_candidates(model: nn.Module, example_inputs: torch.Tensor, loader: Iterable, k: int = 8,
                       steps: int = 20, lr: float = 1e-3, penalty: float = 1e-2, init_scale: float = 0.1,
                       loss_fn: Callable = F.cross_entropy, layers: list[str] | None = None,
                       generator: torch.Generator | None = None) -> dict[str, FireflyCandidates]:
    """Optimise the candidates' perturbations on ``steps`` batches, then score them on the same batches."""
    neurons = splittable_layers(model, example_inputs, layers)
    names = {m: n for n, m in model.named_modules()}
    cand = copy.deepcopy(model).eval()
    widths = {n: nr.layer.weight.shape[0] for n, nr in neurons.items()}
    add_channels(cand, example_inputs, {n: NewChannels(k) for n in neurons})
    graph = CouplingGraph(cand, example_inputs)
    new_pos: dict[tuple[str, str], set[int]] = {}
    consumers: dict[str, dict[str, torch.Tensor]] = {}
    for n in neurons:
        g = graph.group(n)
        for s in g.slots:
            if s.role == "consumer" and len(s.positions[0]) == 1:
                idx = [s.positions[widths[n] + j][0] for j in range(k)]
                new_pos.setdefault((s.name, "in"), set()).update(idx)
                consumers.setdefault(n, {})[s.name] = torch.as_tensor(idx, device=model_device(model))
    orig_in = {}
    for n in neurons:
        added = new_pos.get((n, "in"), set())
        if added:
            orig_in[n] = torch.as_tensor([i for i in range(graph.modules[n].weight.shape[1]) if i not in added],
                                         device=model_device(model))
    h = _Candidate(cand, neurons, names, widths, k, orig_in)
    gen = generator or torch.Generator().manual_seed(0)
    before = dict(model.named_modules())
    for n, nr in neurons.items():
        row, like = tuple(nr.layer.weight.shape[1:]), nr.layer.weight  # CPU draws, then the layer's device/dtype
        h.params[f"{n}.D"] = ((torch.rand((widths[n], *row), generator=gen) * 2 - 1) * init_scale).to(like)
        h.params[f"{n}.A"] = (torch.randn((k, *row), generator=gen) * init_scale).to(like)
        for cname in consumers.get(n, {}):
            w = graph.modules[cname].weight
            col = (before[cname].weight.shape[0], *w.shape[2:])  # its own rows (a residual stream widened them)
            h.params[f"{n}->{cname}.B"] = ((torch.rand((k, *col), generator=gen) * 2 - 1) * 0.01).to(w)
    for p in h.params.values():
        p.requires_grad_()
    base = {name: p.detach() for name, p in cand.named_parameters()}
    device = model_device(model)
    batches = [(like_model(model, x), y.to(device)) for x, y in itertools.islice(loader, steps)]

    def forward(x):
        weights = dict(base)
        for n, cons in consumers.items():
            for cname, idx in cons.items():
                b = h.params[f"{n}->{cname}.B"].movedim(0, 1)  # (rows, K, *kernel)
                w = weights[f"{cname}.weight"]
                rows = b.shape[0]
                cols = w[:rows].index_copy(1, idx, b)
                weights[f"{cname}.weight"] = torch.cat([cols, w[rows:]]) if rows < w.shape[0] else cols
        return functional_call(cand, weights, (x,))

    opt = torch.optim.RMSprop(list(h.params.values()), lr=lr, momentum=0.1, alpha=0.9)
    try:
        for n in neurons:
            h.gates[n] = torch.ones(widths[n] + k, device=device)
        for x, y in batches:
            opt.zero_grad()
            loss = loss_fn(forward(x), y) + penalty * sum(h.params[f"{n}.D"].pow(2).sum()
                                                          + 1e-2 * h.params[f"{n}.A"].pow(2).sum() for n in neurons)
            loss.backward()
            if world_size() > 1:  # the gradient of the whole batch: shards' means weighted by their samples
                share = batch_share(len(y), device)
                for p in h.params.values():
                    p.grad = all_reduce_sum(p.grad * share)
            opt.step()
        for n in neurons:
            h.gates[n] = torch.ones(widths[n] + k, device=device, requires_grad=True)
        scores = {n: torch.zeros(widths[n] + k, device=device) for n in neurons}
        for x, y in batches:
            grads = torch.autograd.grad(loss_fn(forward(x), y), [h.gates[n] for n in neurons])
            share = batch_share(len(y), device) if world_size() > 1 else None
            for n, g in zip(neurons, grads, strict=True):
                scores[n] += (g if share is None else all_reduce_sum(g * share)) / len(batches)
    finally:
        h.close()
    return {n: FireflyCandidates(n, h.params[f"{n}.D"].detach(), h.params[f"{n}.A"].detach(),
                                 {c: h.params[f"{n}->{c}.B"].detach() for c in consumers.get(n, {})},
                                 scores[n][:widths[n]], scores[n][widths[n]:]) for n in neurons}


def candidate_scores(cands: dict[str, FireflyCandidates]) -> dict[tuple[str, str, int], float]:
    """Every candidate's score by key ``(layer, "split" | "new", index)``; a layer's new neurons only where they
    have a consumer to feed."""
    scores = {}
    for n, c in cands.items():
        scores.update({(n, "split", i): float(v) for i, v in enumerate(c.split_scores)})
        if c.new_fan_out:  # a new neuron without a consumer it can feed is useless
            scores.update({(n, "new", j): float(v) for j, v in enumerate(c.new_scores)})
    return scores


def firefly_grow(model: nn.Module, example_inputs: torch.Tensor, loader: Iterable, grow_ratio: float = 0.35,
                 k: int = 8, eps: float = 1.0, optimizer: torch.optim.Optimizer | None = None,
                 max_macs: float | None = None, calibrate_norms: bool = True, **kw) -> FireflyReport:
    """Score candidates (:func:`firefly_candidates`), keep the most negative ``⌊grow_ratio x neurons⌋`` and apply
    them in place: new neurons first (fan-in ``eps·A``, fan-out ``B``), then splits (``±eps·D``).

    With ``calibrate_norms`` the new neurons' batch-norm entries are the identity on the data in train mode too
    (:func:`~baselines.norm_init.calibrate_new_norms`), so training goes on from the function that was scored
    instead of from new channels rescaled to unit variance.

    With ``max_macs`` the negative scores are taken, most negative first, until the next would take the model
    past it."""
    cands = firefly_candidates(model, example_inputs, loader, k=k, **kw)
    total = sum(c.split_scores.numel() for c in cands.values())
    scores = candidate_scores(cands)
    if max_macs is None:
        chosen = select_most_negative(scores, int(grow_ratio * total))
    else:
        chosen = select_most_negative({key: v for key, v in scores.items() if v < 0}, len(scores))
        chosen = chosen[:prefix_within_macs(model, example_inputs, [(n, 1) for n, _, _ in chosen], max_macs)]
    splits: dict[str, list[int]] = {}
    new: dict[str, list[int]] = {}
    for n, kind, i in chosen:
        (splits if kind == "split" else new).setdefault(n, []).append(i)
    if new:
        add_channels(model, example_inputs, {
            n: NewChannels(len(js), fan_in=eps * cands[n].new_fan_in[js],
                           fan_out={c: b[js] for c, b in cands[n].new_fan_out.items()}) for n, js in new.items()},
            optimizer=optimizer)
        if calibrate_norms:  # new channels are the last ones until the splits below
            calibrate_new_norms(model, example_inputs, {n: len(js) for n, js in new.items()}, loader)
    if splits:
        graph = CouplingGraph(model, example_inputs)
        plan = {}
        for n, cs in splits.items():
            d = _pad_fan_in(graph, n, cands[n].split_dirs, new)
            plan[n] = [(c, SplitScheme((0.5, 0.5), torch.stack([d[c], -d[c]]))) for c in cs]
        split(model, example_inputs, plan, eps=eps, optimizer=optimizer, graph=graph)
    return FireflyReport({n: sorted(v) for n, v in splits.items()}, {n: len(v) for n, v in new.items()})


def _pad_fan_in(graph: CouplingGraph, layer: str, dirs: torch.Tensor, new: dict[str, list[int]]) -> torch.Tensor:
    """Directions over the original fan-in, zero-padded at the input columns just added to ``layer``."""
    fan_in = graph.modules[layer].weight.shape[1]
    if fan_in == dirs.shape[1]:
        return dirs
    added = set()
    for n, js in new.items():
        g = graph.group(n)
        c0 = g.width - len(js)
        for s in g.slots:
            if s.name == layer and s.dim == "in":
                added.update(p for c in range(c0, g.width) for p in s.positions[c])
    keep = torch.as_tensor([i for i in range(fan_in) if i not in added])
    out = torch.zeros((dirs.shape[0], fan_in, *dirs.shape[2:]), dtype=dirs.dtype)
    out[:, keep] = dirs
    return out
