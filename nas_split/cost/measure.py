"""A model's costs for one sample: MACs and params (counted), peak activation memory and energy (estimated), the
cost model's price per layer and latency (measured), with the per-layer breakdown (:func:`measure_cost`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..numerics import evaluating, like_model
from .counting import count_macs, first_sample
from .latency import measure_latency
from .models import CostModel, EnergyModel
from .registry import cost_model as _cost_model
from .shapes import BYTES, LayerShape, layer_shape

__all__ = ["LayerCost", "CostReport", "measure_cost"]

_LEAF_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


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


def measure_cost(model: nn.Module, example_inputs: torch.Tensor, energy_model: EnergyModel | None = None,
                 latency: bool = True, cost_model: CostModel | str | None = None) -> CostReport:
    """Count MACs and params, estimate activation memory and energy, price the layers with ``cost_model`` (a
    :class:`~nas_split.cost.CostModel` or its name; default: the energy model) and (optionally) measure
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
            ib = sum(t.numel() for t in inp if torch.is_tensor(t)) * BYTES
            ob = (out.numel() if torch.is_tensor(out) else 0) * BYTES
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
        layers.append(LayerCost(name, type(mod).__name__, macs, params, params * BYTES, ib, ob,
                                em.layer_energy_pj(macs, params * BYTES + ib + ob), priced_by.layer_cost(shape),
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
