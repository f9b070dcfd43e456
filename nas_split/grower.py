"""``Grower``: analyze -> select -> split, the way Torch-Pruning's pruner runs importance -> selection -> prune.

Drive it from any training loop::

    grower = nas_split.Grower(model, example_inputs, method="s3d", grow_ratio=0.3, optimizer=opt)
    for round in range(rounds):
        train(model, opt, epochs)
        report = grower.step(train_loader)      # splits in place, carries opt's state

Methods: the splitting variants of :data:`nas_split.splitting.variants.VARIANTS` (``s2d`` exact matrices + S2D
splits, ``fast`` Rayleigh-quotient analysis + S2D, ``s3d`` fast analysis of both spectrum ends + signed splits,
``s3d-exact``, ``energy`` = ``fast`` with the LP); ``energy_aware=True`` replaces the grow-ratio selection by the
linear program over MAC costs, or over a cost model's prices (``cost="model"``: an analytic energy model, a
measured latency table, a device profile; :mod:`nas_split.cost`), for any of them.

The coupling graph and the splittable layers are traced once per architecture (cached by the layer widths), and
the trial split that verifies a layer is growable runs once per layer in the Grower's lifetime.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .cost import CostModel, count_macs
from .cost import cost_model as build_cost_model
from .distributed import broadcast_object, world_size
from .errors import ConfigError
from .growth.channel_cost import channel_costs, prefix_within_macs
from .growth.neurons import Neuron, NotAnalyzableError, splittable_layers
from .splitting.analysis import Spectrum
from .splitting.schemes import RANKS, NeuronSplit
from .splitting.selection import ARMS, Candidate, random_directions, select_lp, select_ratio, within_layer_random
from .splitting.variants import VARIANTS
from .surgery import CouplingGraph, NotGrowableError, layer_sizes, split

__all__ = ["Grower", "GrowthReport", "VARIANTS", "NotAnalyzableError", "splittable_layers"]


@dataclass
class GrowthReport:
    """What one :meth:`Grower.step` did."""

    splits: list[NeuronSplit]
    widths: dict[str, tuple[int, int]]
    lam_stats: dict[str, dict[str, float]]
    predicted_change: float
    analysis_seconds: float
    split_seconds: float
    schemes: dict[str, int] = field(default_factory=dict)

    @property
    def new_neurons(self) -> int:
        """Neurons added."""
        return sum(b - a for a, b in self.widths.values())

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        per_layer = {}
        for s in self.splits:
            d = per_layer.setdefault(s.layer, {"split": 0, "new_neurons": 0})
            d["split"] += 1
            d["new_neurons"] += s.new_neurons
        return {"new_neurons": self.new_neurons, "split": len(self.splits), "schemes": self.schemes,
                "predicted_loss_change": self.predicted_change, "analysis_seconds": self.analysis_seconds,
                "split_seconds": self.split_seconds, "per_layer": per_layer,
                "widths": {k: list(v) for k, v in self.widths.items()}, "lambda": self.lam_stats}


class Grower:
    """Grows ``model`` in place by splitting steepest descent.

    Args:
        model: the network (any ``nn.Module`` whose neurons are conv/linear -> [batch norm] -> activation module).
        example_inputs: a batch used to trace couplings and count costs.
        method: a key of :data:`~nas_split.splitting.variants.VARIANTS`.
        grow_ratio: new neurons per round as a fraction of the current neurons of the analysed layers.
        eps: split step ε.
        c: S3D mass budget ``Σ|w_i| <= c`` (``c >= 1``; 1 is S2D).
        max_copies: 3 or 4 (S3D's 4-copy scheme).
        only_negative: split only neurons whose predicted loss change is negative.
        s3d_rank: how S3D chooses a neuron's scheme and ranks candidates: ``"neuron"`` (gain per added neuron,
            the default) or ``"total"`` (total gain; :mod:`nas_split.splitting.schemes`).
        selection: ``"top"`` (the method's choice) or an ablation arm of
            :data:`~nas_split.splitting.selection.ARMS` (``reverse``, ``layer-random``, ``random-direction``);
            the arms need the ratio or MAC-cap selection, not the LP.
        energy_aware: select with the LP over costs instead of the ratio.
        cost: the LP's cost: ``"macs"`` or ``"model"`` (``cost_model``'s price of a new channel).
        cost_model: a :class:`~nas_split.cost.CostModel` or its name (default ``horowitz-45nm``).
        budget_scale: multiplies the LP's default budgets.
        groups, quotas: ``{layer: group}`` and ``{group: ratio}`` for per-group quotas / budgets.
        max_width, round_to: per-layer cap and width rounding, as in :func:`nas_split.split`.
        max_macs: MACs per sample the model may reach after a step: the selection, best first, is cut where the
            next split would exceed it.  With ``grow_ratio=None`` the budget alone sets how many neurons are split
            (with ``energy_aware`` the remaining MACs are the LP's budget; with ``cost="model"`` converted into the
            model's unit at its price per MAC of growing every layer alike).
        layers: restrict growth to these layers (default: every growable layer with a nonlinearity).
        optimizer: its state is carried through each split.
        loss_fn: loss used for the analysis (default cross-entropy).
        beta: softplus surrogate curvature for ReLU / ReLU6.
        analysis_batches: batches of the analysis loader (exact: all by default; fast: 20 per pass).
        fast_passes, fast_lr: Rayleigh-quotient iterations.
        seed: random source of the fast method's initial directions.
        trusted: layers verified growable before (e.g. by the previous round's Grower, :attr:`verified`): their
            trial split is skipped (widening a layer does not change how its channels are coupled).
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, method: str = "s2d", *,
                 grow_ratio: float | None = 0.3, eps: float = 1e-2, c: float = 3.0, max_copies: int = 4,
                 only_negative: bool = True, s3d_rank: str = "neuron", selection: str = "top",
                 energy_aware: bool = False, cost: str = "macs",
                 cost_model: CostModel | str | None = None, budget_scale: float = 1.0,
                 groups: Mapping[str, str] | None = None, quotas: Mapping[str, float] | None = None,
                 max_width: int | Mapping[str, int] | None = None, round_to: int | None = None,
                 max_macs: float | None = None, layers: list[str] | None = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                 beta: float = 3.0, analysis_batches: int | None = None, fast_passes: int = 3,
                 fast_lr: float = 0.05, seed: int = 0, trusted: Collection[str] = ()):
        if method not in VARIANTS:
            raise ConfigError(f"unknown growth method {method!r}; known: {', '.join(VARIANTS)}")
        if not eps > 0:
            raise ConfigError(f"eps must be > 0, got {eps}")
        if c < 1:
            raise ConfigError(f"the S3D mass budget c must be >= 1, got {c}")
        if max_copies not in (3, 4):
            raise ConfigError(f"max_copies must be 3 or 4, got {max_copies}")
        if s3d_rank not in RANKS:
            raise ConfigError(f"s3d_rank must be one of {', '.join(RANKS)}, got {s3d_rank!r}")
        if selection not in ARMS:
            raise ConfigError(f"selection must be one of {', '.join(ARMS)}, got {selection!r}")
        if selection != "top" and (energy_aware or VARIANTS[method].energy_aware):
            raise ConfigError(f"selection {selection!r} is an arm of the ratio / MAC-cap selection, not of the "
                              "energy-aware LP")
        if cost not in ("macs", "model"):
            raise ConfigError(f"cost must be 'macs' or 'model', got {cost!r}")
        if grow_ratio is None and max_macs is None:
            raise ConfigError("grow_ratio=None needs max_macs (the budget then sets the count)")
        if grow_ratio is not None and grow_ratio < 0:
            raise ConfigError(f"grow_ratio must be >= 0, got {grow_ratio}")
        self.model, self.example_inputs = model, example_inputs
        self.method, self.variant = method, VARIANTS[method]
        self.grow_ratio, self.eps, self.c, self.max_copies = grow_ratio, eps, c, max_copies
        self.only_negative, self.cost, self.budget_scale = only_negative, cost, budget_scale
        self.s3d_rank, self.selection = s3d_rank, selection
        self.energy_aware = energy_aware or self.variant.energy_aware
        self.cost_model = build_cost_model(cost_model)
        self.groups, self.quotas = dict(groups or {}), dict(quotas or {})
        self.max_width, self.round_to, self.max_macs = max_width, round_to, max_macs
        self.requested_layers = layers
        self.optimizer, self.loss_fn, self.beta = optimizer, loss_fn, beta
        self.analysis_batches, self.fast_passes, self.fast_lr = analysis_batches, fast_passes, fast_lr
        self.generator = torch.Generator().manual_seed(seed)
        self.spectra: dict[str, Spectrum] = {}  # the last analysis (the fast method warm-starts from it)
        self._trace: tuple[tuple, CouplingGraph, dict[str, Neuron]] | None = None  # (widths, graph, neurons)
        self.verified: set[str] = set(trusted)  # layers whose trial split preserved the function
        if not self.neurons():
            raise NotGrowableError("the model has no growable layer with a nonlinearity to split")

    def graph(self) -> CouplingGraph:
        """The coupling graph of the model as it is now (traced once per architecture)."""
        return self._traced()[1]

    def neurons(self) -> dict[str, Neuron]:
        """The analysed layers (growable, with a nonlinearity; one per coupled group) and their neurons."""
        return self._traced()[2]

    def _traced(self) -> tuple[tuple, CouplingGraph, dict[str, Neuron]]:
        key = tuple(tuple(v) for v in layer_sizes(self.model).values())
        if self._trace is None or self._trace[0] != key:
            graph = CouplingGraph(self.model, self.example_inputs)
            neurons = splittable_layers(self.model, self.example_inputs, self.requested_layers, graph=graph,
                                        trusted=self.verified)
            self.verified |= set(neurons)
            self._trace = (key, graph, neurons)
        return self._trace

    def analyze(self, loader: Iterable) -> dict[str, Spectrum]:
        """Per analysed layer: ``λ_min``, ``v_min``, ``λ_max``, ``v_max`` of every neuron's splitting matrix."""
        self.spectra = self.variant.analysis(self, loader, self.variant.ends)
        return self.spectra

    def candidates(self, spectra: Mapping[str, Spectrum]) -> list[NeuronSplit]:
        """The variant's scheme for every neuron."""
        return [self.variant.scheme(self, layer, o, sp) for layer, sp in spectra.items()
                for o in range(sp.lam_min.shape[0])]

    def select(self, splits: list[NeuronSplit]) -> list[NeuronSplit]:
        """Choose splits by grow ratio (with quotas) or, when ``energy_aware``, by the LP over costs; best first
        (worst first for ``selection="reverse"``), cut at ``max_macs`` when set; then the ``layer-random`` /
        ``random-direction`` arms redraw the neurons within each layer / the directions of what was chosen."""
        graph = self.graph()
        layers = sorted({s.layer for s in splits})
        widths = {n: graph.group(n).width for n in layers}
        groups = {n: self.groups.get(n, "all") for n in layers}
        if not self.energy_aware and self.grow_ratio is None:
            chosen = [Candidate(s) for s in splits if not self.only_negative or s.gain < 0]
        elif not self.energy_aware:
            cands = [Candidate(s, 0.0, groups[s.layer]) for s in splits]
            chosen = select_ratio(cands, widths, self.grow_ratio, self.only_negative, self.quotas, groups,
                                  reverse=self.selection == "reverse")
        else:
            per = channel_costs(self.model, self.example_inputs, {n: graph.group(n) for n in layers},
                                self.cost_model)
            unit = {n: (per[n].macs if self.cost == "macs" else per[n].priced) for n in layers}
            ratio = 1.0 if self.grow_ratio is None else self.grow_ratio  # no ratio: quotas only share the budget
            budgets: dict[str, float] = {}
            for n in layers:
                g = groups[n]
                budgets[g] = budgets.get(g, 0.0) + self.quotas.get(g, ratio) * widths[n] * unit[n] * self.budget_scale
            if self.grow_ratio is None:  # the remaining MACs, shared as the quotas are, in the LP's unit
                room = max(0.0, self.max_macs - count_macs(self.model, self.example_inputs)[0])
                if self.cost == "model":  # at the price per MAC of growing every layer alike
                    room *= sum(widths[n] * per[n].priced for n in layers) / \
                        max(sum(widths[n] * per[n].macs for n in layers), 1e-12)
                total = sum(budgets.values()) or 1.0
                budgets = {g: room * b / total for g, b in budgets.items()}
            cands = [Candidate(s, unit[s.layer] * s.new_neurons, groups[s.layer]) for s in splits
                     if not self.only_negative or s.gain < 0]
            room = None
            if self.max_width is not None:
                cap = self.max_width
                room = {n: (cap.get(n) if isinstance(cap, Mapping) else cap) - widths[n] for n in layers
                        if (cap.get(n) if isinstance(cap, Mapping) else cap) is not None}
            chosen, _ = select_lp(cands, budgets, room)
        picked = sorted((c.split for c in chosen), key=lambda s: s.score, reverse=self.selection == "reverse")
        if self.max_macs is not None:
            k = prefix_within_macs(self.model, self.example_inputs, [(s.layer, s.new_neurons) for s in picked],
                                   self.max_macs, graph)
            picked = picked[:k]
        if self.selection == "layer-random":
            picked = within_layer_random(picked, splits, self.generator)
        elif self.selection == "random-direction":
            picked = random_directions(picked, self.generator)
        return picked

    def step(self, loader: Iterable) -> GrowthReport:
        """Analyze on ``loader``, select and split in place (carrying the optimizer state)."""
        t0 = time.perf_counter()
        spectra = self.analyze(loader)
        analysis_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        candidates = self.candidates(spectra)
        chosen = self.select(candidates)
        if world_size() > 1:  # process 0 decides (the spectra agree, so this only guards against float ties)
            by_key = {(s.layer, s.channel, s.kind): s for s in [*candidates, *chosen]}
            chosen = [by_key[k] for k in broadcast_object([(s.layer, s.channel, s.kind) for s in chosen])]
        by_layer: dict[str, list] = {}
        for s in sorted(chosen, key=lambda s: s.score):
            by_layer.setdefault(s.layer, []).append((s.channel, s.scheme))
        report = split(self.model, self.example_inputs, by_layer, eps=self.eps, optimizer=self.optimizer,
                       max_width=self.max_width, round_to=self.round_to, graph=self.graph())
        dropped = set(report.dropped)
        done = [s for s in chosen if (s.layer, s.channel) not in dropped]
        kinds: dict[str, int] = {}
        for s in done:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        stats = {layer: _stats(sp) for layer, sp in spectra.items()}
        return GrowthReport(done, {k: v for k, v in report.widths.items()}, stats,
                            sum(s.predicted_change(self.eps) for s in done), analysis_s,
                            time.perf_counter() - t1, kinds)


def _stats(sp: Spectrum) -> dict[str, float]:
    def q(t: torch.Tensor) -> dict[str, float]:
        t = t[torch.isfinite(t)].double()
        if t.numel() == 0:
            return {}
        return {"min": t.min().item(), "median": t.median().item(), "max": t.max().item()}

    return {**{f"lam_min_{k}": v for k, v in q(sp.lam_min).items()},
            **{f"lam_max_{k}": v for k, v in q(sp.lam_max).items()},
            "negative": int((sp.lam_min < 0).sum().item())}
