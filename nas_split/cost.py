"""Cost accounting: MACs, parameters, activation memory, an energy estimate and measured latency.

Conventions (every figure says how it was obtained, see :attr:`CostReport.provenance`):

* **MACs** (counted): multiply-accumulates of convolutions and matrix products per sample, i.e.
  ``torch.utils.flop_counter.FlopCounterMode`` total / 2 (timm ``mobilenetv2_100`` at 224 px: 300.77 M).
  BatchNorm, activations and pooling are not counted.
* **params** (counted): number of parameters.
* **peak activation memory** (estimated): the largest ``input + output`` bytes of one leaf module for one
  sample, a lower bound of inference peak memory for chain-like networks.
* **energy** (estimated) per conv/linear layer ``l``:  ``E_l = MACs_l * e_mac + bytes_l * e_mem``, with
  ``bytes_l`` = weights + input + output activations (float32); operations outside conv/linear layers (e.g. the
  ``bmm`` of a T-Net) are charged their MACs only, under the key ``"(other)"``.  Default constants from
  M. Horowitz, "Computing's energy problem", ISSCC 2014 (45 nm, 32-bit float): multiply 3.7 pJ + add 0.9 pJ per
  MAC, and 640 pJ per 32-bit DRAM access (160 pJ/byte); :meth:`EnergyModel.sram` uses the 8 KB SRAM read
  (5 pJ per 32-bit word) instead.  It is a model, not a measurement.
* **latency** (measured): median wall time of a forward pass, ``torch.utils.benchmark``, batch 1, eval mode.
* **training MACs** (counted, with a rule of thumb): a training step costs :data:`TRAIN_MACS_PER_SAMPLE` = 3
  forward MACs per sample (forward, plus a backward pass that computes input and weight gradients, each about
  one forward).  A stage that trains on ``n`` samples at ``M`` MACs costs ``3 n M`` (:func:`training_macs`);
  the passes a growth or pruning step makes to decide (analysis, scoring) are counted by
  :class:`PassCounter`: ``3 M`` per sample forwarded with gradients on, ``M`` without.  Evaluation is not
  counted.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .cost_models import CostModel, EnergyModel, LayerShape, layer_shape
from .cost_models import cost_model as _cost_model
from .numerics import evaluating, like_model

__all__ = ["EnergyModel", "LayerCost", "CostReport", "count_macs", "measure_cost", "measure_latency",
           "first_sample", "TRAIN_MACS_PER_SAMPLE", "training_macs", "PassCounter"]

#: Forward-MAC multiples of one training sample: forward + backward (input and weight gradients).
TRAIN_MACS_PER_SAMPLE = 3

_LEAF_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BYTES = 4  # float32


@dataclass
class LayerCost:
    """Cost of one conv/linear layer for one sample: counted figures, the analytic energy and the layer's cost
    under the report's cost model (``priced``, in its unit); ``shape`` is what the cost model priced."""

    name: str
    type: str
    macs: int
    params: int
    weight_bytes: int
    input_bytes: int
    output_bytes: int
    energy_pj: float
    priced: float = 0.0
    shape: LayerShape | None = None


@dataclass
class CostReport:
    """Whole-model costs for one sample, with the per-layer breakdown."""

    macs: int
    params: int
    peak_activation_bytes: int
    energy_uj: float
    latency_ms: float | None
    layers: list[LayerCost]
    energy_model: EnergyModel = field(default_factory=EnergyModel)
    priced: float = 0.0
    cost_model: dict = field(default_factory=lambda: EnergyModel().describe())
    provenance: dict[str, str] = field(default_factory=lambda: {
        "macs": "counted (FlopCounterMode / 2, conv + matmul)", "params": "counted",
        "peak_activation_bytes": "estimated (max input+output bytes of one layer, float32)",
        "energy_uj": "estimated (per-layer model, see energy_model.source)",
        "priced": "the cost model's sum over layers (see cost_model: label, unit, measured, source)",
        "latency_ms": "measured (median, torch.utils.benchmark, batch 1)"})

    @property
    def mmacs(self) -> float:
        """MACs in millions."""
        return self.macs / 1e6

    def to_dict(self, layers: bool = False) -> dict:
        """JSON-ready summary (``layers=True`` adds the per-layer breakdown)."""
        d = {"macs": self.macs, "mmacs": self.mmacs, "params": self.params,
             "peak_activation_bytes": self.peak_activation_bytes, "energy_uj_est": self.energy_uj,
             "latency_ms": self.latency_ms, "energy_model": asdict(self.energy_model), "priced": self.priced,
             "cost_model": self.cost_model, "provenance": self.provenance}
        if layers:
            d["layers"] = [{k: v for k, v in asdict(lc).items() if k != "shape"} for lc in self.layers]
        return d


def first_sample(example_inputs: torch.Tensor) -> torch.Tensor:
    """The first sample of a batch, kept as a batch of one."""
    return example_inputs[:1]


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, dict[str, int]]:
    """MACs for one sample: the total and a dict ``{module name: MACs}`` over every module that issued any.

    The dict has one entry per leaf module (names as in ``model.named_modules()``); MACs of functional ops
    issued directly by a non-leaf module are under that module's name.
    """
    x = like_model(model, first_sample(example_inputs))
    with evaluating(model), torch.no_grad(), FlopCounterMode(display=False, depth=None) as fc:
        model(x)
    counts = fc.get_flop_counts()
    root = type(model).__name__
    per_name = {}
    for key, ops in counts.items():
        if key == "Global":
            continue
        name = key[len(root) + 1:] if key.startswith(root + ".") else ("" if key == root else key)
        per_name[name] = sum(ops.values()) // 2
    # keep only what each module issued itself: subtract its direct children
    own = {}
    for name, total in per_name.items():
        children = sum(v for n, v in per_name.items() if n != name and n.startswith(f"{name}." if name else "")
                       and "." not in n[len(name) + 1 if name else 0:])
        if total - children > 0:
            own[name] = total - children
    return int(fc.get_total_flops() // 2), own


def measure_latency(model: nn.Module, example_inputs: torch.Tensor, min_run_time: float = 0.3) -> float:
    """Median forward latency in milliseconds for one sample (eval mode, no grad)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on CPU hosts
    from torch.utils import benchmark

    x = like_model(model, first_sample(example_inputs))
    with evaluating(model), torch.no_grad():
        model(x)  # warm-up
        t = benchmark.Timer("model(x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads())
        return t.blocked_autorange(min_run_time=min_run_time).median * 1e3


def measure_cost(model: nn.Module, example_inputs: torch.Tensor, energy_model: EnergyModel | None = None,
                 latency: bool = True, cost_model: CostModel | str | None = None) -> CostReport:
    """Count MACs and params, estimate activation memory and energy, price the layers with ``cost_model`` (a
    :class:`~nas_split.cost_models.CostModel` or its name; default: the energy model) and (optionally) measure
    latency."""
    em = energy_model or EnergyModel()
    priced_by = em if cost_model is None else _cost_model(cost_model)
    x = like_model(model, first_sample(example_inputs))
    total, own = count_macs(model, x)
    io: dict[str, tuple[int, int, tuple[int, ...], int]] = {}
    peak = 0

    def hook(name):
        def fn(mod, inp, out):
            nonlocal peak
            ib = sum(t.numel() for t in inp if torch.is_tensor(t)) * _BYTES
            ob = (out.numel() if torch.is_tensor(out) else 0) * _BYTES
            peak = max(peak, ib + ob)
            if isinstance(mod, _LEAF_TYPES):
                io[name] = (ib, ob, tuple(inp[0].shape[1:]), out.numel())
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if not list(m.children())]
    try:
        with evaluating(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    layers = []
    for name, (ib, ob, size, out_numel) in io.items():
        mod = modules[name]
        params = sum(p.numel() for p in mod.parameters(recurse=False))
        macs = own.get(name, 0)
        shape = layer_shape(mod, size, out_numel, macs)
        layers.append(LayerCost(name, type(mod).__name__, macs, params, params * _BYTES, ib, ob,
                                em.layer_energy_pj(macs, params * _BYTES + ib + ob), priced_by.layer_cost(shape),
                                shape))
    other = total - sum(lc.macs for lc in layers)
    if other > 0:
        layers.append(LayerCost("(other)", "functional", other, 0, 0, 0, 0, em.layer_energy_pj(other, 0),
                                priced_by.other_cost(other)))
    return CostReport(
        macs=total, params=sum(p.numel() for p in model.parameters()), peak_activation_bytes=peak,
        energy_uj=sum(lc.energy_pj for lc in layers) / 1e6,
        latency_ms=measure_latency(model, x) if latency else None, layers=layers, energy_model=em,
        priced=sum(lc.priced for lc in layers), cost_model=priced_by.describe())


def training_macs(macs: float, samples: int) -> float:
    """MACs of training a model of ``macs`` MACs per sample on ``samples`` samples: ``3 x samples x macs``."""
    return TRAIN_MACS_PER_SAMPLE * samples * macs


class PassCounter:
    """Counts the samples forwarded through ``model`` inside the ``with`` block, with and without gradients.

    ``macs(m)`` is the cost of those passes at ``m`` MACs per sample: ``3 m`` per sample forwarded with autograd
    on (a backward is assumed to follow), ``m`` per sample without.  Nested calls of ``model`` (a wrapper calling
    the model) count once per call of ``model`` itself.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.with_grad = 0
        self.without_grad = 0

    def _hook(self, _module, args) -> None:
        x = args[0] if args else None
        n = int(x.shape[0]) if torch.is_tensor(x) and x.dim() > 0 else 1
        if torch.is_grad_enabled():
            self.with_grad += n
        else:
            self.without_grad += n

    def __enter__(self) -> PassCounter:
        self._handle = self.model.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def macs(self, macs_per_sample: float) -> float:
        """MACs of the counted passes at ``macs_per_sample``."""
        return training_macs(macs_per_sample, self.with_grad) + macs_per_sample * self.without_grad
