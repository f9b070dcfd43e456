"""Cost accounting and cost models.

* :mod:`.counting`: MACs per sample (``torch.utils.flop_counter``), training MACs and the decision passes'
  MACs (:class:`PassCounter`).
* :mod:`.shapes`: :class:`LayerShape`, one conv/linear layer as it runs on one sample (what cost models price).
* :mod:`.models`: the :class:`CostModel` interface, linear :class:`Coefficients` and the analytic
  :class:`EnergyModel` (estimated; names ``horowitz-45nm`` and ``horowitz-45nm-sram``).
* :mod:`.profiles`: :class:`ProfileModel`, a device profile file the user supplies (measured or estimated, as the
  file says), checked by :class:`ProfileFile`.
* :mod:`.latency`: the one forward timer, a model's measured latency and :class:`LatencyTable` (measured per
  layer shape on this machine and cached; names ``latency``, ``latency-cpu``, ``latency-cuda``).
* :mod:`.registry`: cost models by name (:func:`cost_model`).
* :mod:`.measure`: :func:`measure_cost`, a model's :class:`CostReport` with its per-layer breakdown.

Layered one way: shapes < models < profiles < counting < latency < registry < measure.

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
* **training MACs**: :mod:`.counting`.
"""
from .counting import TRAIN_MACS_PER_SAMPLE, PassCounter, count_macs, first_sample, input_gradients_only, training_macs
from .latency import LatencyTable, device_name, latency_cache_path, measure_latency, time_forward
from .measure import CostReport, LayerCost, measure_cost
from .models import Coefficients, CostModel, EnergyModel
from .profiles import ProfileFile, ProfileModel
from .registry import COST_MODELS, check_spec, cost_model
from .shapes import LayerShape, layer_shape

__all__ = ["TRAIN_MACS_PER_SAMPLE", "input_gradients_only", "PassCounter",
           "count_macs", "first_sample", "training_macs", "LatencyTable",
           "device_name", "latency_cache_path", "measure_latency", "time_forward", "CostReport", "LayerCost",
           "measure_cost", "Coefficients", "CostModel", "EnergyModel", "ProfileFile", "ProfileModel",
           "COST_MODELS", "check_spec", "cost_model", "LayerShape", "layer_shape"]
