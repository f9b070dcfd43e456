"""Cost models: what one conv/linear layer of a given shape costs on a device, in one unit.

The energy-aware LP (:mod:`nas_split.splitting.channel_cost`), the per-stage records, the comparison tables and
the Pareto plots price a network with one :class:`CostModel`.  A network's cost is the sum of its conv/linear
layers' :meth:`CostModel.layer_cost` plus :meth:`CostModel.other_cost` of the MACs issued outside them (a T-Net's
``bmm``).  Three kinds:

* :class:`EnergyModel` (estimated): ``E = MACs x e_mac + bytes x e_mem``, Horowitz ISSCC 2014 constants by
  default.  Names ``horowitz-45nm`` (DRAM traffic) and ``horowitz-45nm-sram``.
* :class:`LatencyTable` (measured): the median batch-1 forward time of each layer shape on this machine, timed
  with ``torch.utils.benchmark`` the first time the shape is priced and cached in a JSON file keyed by the device
  name, the torch version and the thread count (:func:`latency_cache_path`).  Names ``latency`` (the device runs
  train on: ``cuda`` when there is one) and ``latency-cpu`` / ``latency-cuda``.
* :class:`ProfileModel` (measured or estimated, as its file says): a file the user supplies for their device,
  YAML or JSON (format below).  A :class:`LatencyTable`'s cache file is such a file, so a table measured on one
  machine prices runs on another.

Profile file format (every key but ``name`` and ``unit`` optional; ``coefficients`` or ``layers`` required)::

    name: my-npu            # the label tables and plots show
    unit: uJ                # of every figure in the file, per sample
    measured: true          # true: figures measured on the device; false: estimated
    source: power meter on the board's 5 V rail, batch 1, 2026-11
    coefficients:           # linear model: mac x MACs + weight_byte x weight bytes + activation_byte x (in + out)
      mac: 1.2e-6
      weight_byte: 2.0e-5
      activation_byte: 4.0e-7
      per_op:               # optional overrides for one kind of layer: conv, depthwise, linear
        depthwise: {mac: 3.0e-6}
    layers:                 # optional measured entries; an entry whose shape matches a layer exactly wins
      - {op: Conv2d, in_channels: 16, out_channels: 32, input_size: [16, 8, 8], kernel_size: [3, 3],
         stride: [1, 1], padding: [1, 1], dilation: [1, 1], groups: 1, bias: false, cost: 0.0123}

A layer absent from ``layers`` is priced by ``coefficients``; with neither, loading the run fails naming the
shape.  Bytes are float32.  ``docs/profiles/weights_dram_activations_sram.yaml`` is a worked example.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    StrictBool,
    ValidationError,
    model_validator,
)
from torch import nn

from .errors import ConfigError, first_problem

__all__ = ["LayerShape", "layer_shape", "CostModel", "EnergyModel", "ProfileModel", "LatencyTable",
           "latency_cache_path", "device_name", "check_spec", "cost_model", "COST_MODELS"]

_BYTES = 4  # float32
_INSTANCES = 8  # copies of a layer a latency table times, one after the other
_OPS = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d, "Linear": nn.Linear}


@dataclass(frozen=True)
class LayerShape:
    """One conv/linear layer as it runs on one sample: its configuration, its input's shape (batch dim dropped)
    and its counted figures (MACs, float32 bytes of weight, bias, input and output)."""

    op: str
    in_channels: int
    out_channels: int
    input_size: tuple[int, ...]
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = False
    macs: int = field(default=0, compare=False)
    weight_bytes: int = field(default=0, compare=False)
    bias_bytes: int = field(default=0, compare=False)
    input_bytes: int = field(default=0, compare=False)
    output_bytes: int = field(default=0, compare=False)

    @property
    def kind(self) -> str:
        """``linear``, ``depthwise`` (a conv with one input channel per group) or ``conv``."""
        if self.op == "Linear":
            return "linear"
        return "depthwise" if self.groups == self.in_channels == self.out_channels > 1 else "conv"

    def key(self) -> str:
        """A canonical text of the configuration and input shape (the cache and profile key)."""
        return json.dumps(self.config(), sort_keys=True, separators=(",", ":"))

    def config(self) -> dict[str, Any]:
        """The fields that identify the shape (no counted figures), JSON-ready."""
        counted = {"macs", "weight_bytes", "bias_bytes", "input_bytes", "output_bytes"}
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self) if f.name not in counted}

    def grown(self, d_out: int, d_in: int) -> LayerShape:
        """The layer with ``d_out`` more output channels and ``d_in`` more input features (a flatten position
        counts once per position); a depthwise conv grows its channels and groups together by ``max(d_out,
        d_in)``.  Counted figures scale exactly: weights and MACs with ``out x in`` (depthwise: with ``C``)."""
        if self.kind == "depthwise":
            d = max(d_out, d_in)
            f = (self.out_channels + d) / self.out_channels
            fo = fi = fw = f
            new = {"in_channels": self.in_channels + d, "out_channels": self.out_channels + d,
                   "groups": self.groups + d}
            d_in = d
        else:
            fo = (self.out_channels + d_out) / self.out_channels
            fi = (self.in_channels + d_in) / self.in_channels
            fw = fo * fi
            new = {"in_channels": self.in_channels + d_in, "out_channels": self.out_channels + d_out}
        size = list(self.input_size)
        size[-1 if self.op == "Linear" else 0] += d_in
        return replace(self, **new, input_size=tuple(size), macs=round(self.macs * fw),
                       weight_bytes=round(self.weight_bytes * fw), bias_bytes=round(self.bias_bytes * fo),
                       input_bytes=round(self.input_bytes * fi), output_bytes=round(self.output_bytes * fo))

    def build(self) -> tuple[nn.Module, torch.Tensor]:
        """A freshly initialised module of this configuration and a random input batch of one."""
        if self.op == "Linear":
            module = nn.Linear(self.in_channels, self.out_channels, bias=self.bias)
        else:
            pad = self.padding if isinstance(self.padding, str) else tuple(self.padding)
            module = _OPS[self.op](self.in_channels, self.out_channels, tuple(self.kernel_size), tuple(self.stride),
                                   pad, tuple(self.dilation), self.groups, self.bias)
        return module, torch.randn(1, *self.input_size)

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> LayerShape:
        """The shape a profile entry describes (extra keys such as ``cost`` are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})


def layer_shape(module: nn.Module, input_size: tuple[int, ...], output_numel: int, macs: int) -> LayerShape:
    """The :class:`LayerShape` of a conv/linear ``module`` that read an input of ``input_size`` (per sample)."""
    bias = getattr(module, "bias", None) is not None
    common = {"input_size": tuple(input_size), "bias": bias, "macs": macs,
              "weight_bytes": module.weight.numel() * _BYTES,
              "bias_bytes": module.bias.numel() * _BYTES if bias else 0,
              "input_bytes": math.prod(input_size) * _BYTES, "output_bytes": output_numel * _BYTES}
    if isinstance(module, nn.Linear):
        return LayerShape("Linear", module.in_features, module.out_features, **common)
    op = next(n for n, c in _OPS.items() if isinstance(module, c))
    return LayerShape(op, module.in_channels, module.out_channels, kernel_size=tuple(module.kernel_size),
                      stride=tuple(module.stride),
                      padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
                      dilation=tuple(module.dilation), groups=module.groups, **common)


class CostModel(ABC):
    """Prices conv/linear layers in :attr:`unit` per sample.

    Attributes:
        label: the name tables and plots show.
        unit: unit of every figure (``uJ``, ``ms``, ...).
        measured: whether the figures were measured on a device (else estimated from a model).
        source: where the figures come from.
    """

    label: str
    unit: str
    measured: bool
    source: str

    @abstractmethod
    def layer_cost(self, shape: LayerShape) -> float:
        """Cost of one layer of this shape for one sample."""

    def other_cost(self, macs: float) -> float:
        """Cost of ``macs`` MACs issued outside conv/linear layers (0 unless the model says otherwise)."""
        return 0.0

    def channel_cost(self, shape: LayerShape, d_out: int, d_in: int) -> float:
        """Increase of the layer's cost per new channel of a coupled group that adds ``d_out`` outputs and ``d_in``
        input features to it: ``cost(shape.grown(d_out, d_in)) - cost(shape)``, exact for one channel."""
        return self.layer_cost(shape.grown(d_out, d_in)) - self.layer_cost(shape)

    def describe(self) -> dict[str, Any]:
        """``{label, unit, measured, source}``, as records and reports show it."""
        return {"label": self.label, "unit": self.unit, "measured": self.measured, "source": self.source}


@dataclass(frozen=True)
class Coefficients:
    """A linear cost per sample: ``mac x MACs + weight_byte x weight bytes + activation_byte x (in + out) bytes``
    (bias bytes count as weight bytes)."""

    mac: float = 0.0
    weight_byte: float = 0.0
    activation_byte: float = 0.0

    def __call__(self, shape: LayerShape) -> float:
        return (shape.macs * self.mac + (shape.weight_bytes + shape.bias_bytes) * self.weight_byte
                + (shape.input_bytes + shape.output_bytes) * self.activation_byte)


@dataclass(frozen=True)
class EnergyModel(CostModel):
    """Analytic per-layer energy ``E = MACs x e_mac + bytes x e_mem`` (weights + input + output, float32), in µJ.

    Attributes:
        e_mac_pj: energy of one multiply-accumulate, pJ.
        e_mem_pj_per_byte: energy of moving one byte of weights or activations, pJ.
        source: citation of the constants.
    """

    e_mac_pj: float = 3.7 + 0.9
    e_mem_pj_per_byte: float = 640.0 / 4
    source: str = "Horowitz ISSCC 2014, 45 nm fp32: MAC 4.6 pJ (mult 3.7 + add 0.9), DRAM 640 pJ / 32-bit"
    label: str = "horowitz-45nm"
    unit: str = "uJ"
    measured: bool = False

    @classmethod
    def sram(cls) -> EnergyModel:
        """Data in on-chip 8 KB SRAM: 5 pJ per 32-bit read (Horowitz 2014)."""
        return cls(e_mem_pj_per_byte=5.0 / 4, label="horowitz-45nm-sram",
                   source="Horowitz ISSCC 2014, 45 nm fp32: MAC 4.6 pJ, SRAM 5 pJ / 32-bit")

    def layer_energy_pj(self, macs: float, nbytes: float) -> float:
        """Energy of one layer in pJ."""
        return macs * self.e_mac_pj + nbytes * self.e_mem_pj_per_byte

    def layer_cost(self, shape: LayerShape) -> float:
        nbytes = shape.weight_bytes + shape.bias_bytes + shape.input_bytes + shape.output_bytes
        return self.layer_energy_pj(shape.macs, nbytes) / 1e6

    def other_cost(self, macs: float) -> float:
        return macs * self.e_mac_pj / 1e6


class ProfileModel(CostModel):
    """A device profile: exact entries per layer shape, and linear coefficients for any other shape (see the
    module docstring for the file format; :meth:`load` reads one).

    Args:
        label, unit, measured, source: as :class:`CostModel`.
        coefficients: the linear model, or ``None`` (then every priced shape must be in ``entries``).
        per_op: coefficient overrides for ``conv``, ``depthwise`` or ``linear`` layers.
        entries: ``{shape key: cost}``.
    """

    def __init__(self, label: str, unit: str, measured: bool, source: str = "",
                 coefficients: Coefficients | None = None, per_op: dict[str, Coefficients] | None = None,
                 entries: dict[str, float] | None = None):
        self.label, self.unit, self.measured, self.source = label, unit, measured, source
        self.coefficients, self.per_op, self.entries = coefficients, dict(per_op or {}), dict(entries or {})

    def layer_cost(self, shape: LayerShape) -> float:
        key = shape.key()
        if key in self.entries:
            return self.entries[key]
        return self._linear(shape, f"has no entry for layer {key} and no coefficients")(shape)

    def _linear(self, shape: LayerShape, missing: str) -> Coefficients:
        """The coefficients that price ``shape``'s kind of layer; ``missing`` says what is lacking without them."""
        coef = self.per_op.get(shape.kind, self.coefficients)
        if coef is None:
            raise ConfigError(f"cost profile {self.label!r} {missing}")
        return coef

    def other_cost(self, macs: float) -> float:
        return macs * self.coefficients.mac if self.coefficients is not None else 0.0

    def channel_cost(self, shape: LayerShape, d_out: int, d_in: int) -> float:
        """The entries' slope over :func:`_table_step` channels where both ends have an entry; else the
        coefficients' exact increase for one channel."""
        k = _table_step(shape)
        big = shape.grown(k * d_out, k * d_in)
        if shape.key() in self.entries and big.key() in self.entries:
            return (self.entries[big.key()] - self.entries[shape.key()]) / k
        coef = self._linear(shape, f"cannot price a new channel of layer {shape.key()}: no entries for it and "
                                   f"{big.key()}, and no coefficients")
        return coef(shape.grown(d_out, d_in)) - coef(shape)

    @classmethod
    def load(cls, path: str | Path) -> ProfileModel:
        """Read a profile file (YAML or JSON) checked by :class:`ProfileFile`; every problem is a
        :class:`ConfigError` naming the file and the key."""
        from ._io import read_mapping

        p = Path(path)
        f = ProfileFile.read(read_mapping(p, "cost profile"), f"cost profile {str(p)!r}")
        coef, per_op = None, {}
        if f.coefficients is not None:
            coef = Coefficients(**f.coefficients.model_dump(exclude={"per_op"}))
            per_op = {op: Coefficients(**c.model_dump()) for op, c in f.coefficients.per_op.items()}
        entries = {LayerShape.from_config(e.model_dump()).key(): e.cost for e in f.layers}
        return cls(f.name, f.unit, f.measured, f.source, coef, per_op, entries)


_Cost = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _CoefficientsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mac: _Cost = 0.0
    weight_byte: _Cost = 0.0
    activation_byte: _Cost = 0.0


class _CoefficientsFile(_CoefficientsSpec):
    per_op: dict[Literal["conv", "depthwise", "linear"], _CoefficientsSpec] = Field(default_factory=dict)


class _LayerEntry(BaseModel):
    """One ``layers`` entry: a :class:`LayerShape`'s configuration, its ``cost`` and (latency caches) the spread."""

    model_config = ConfigDict(extra="forbid")

    op: Literal["Conv1d", "Conv2d", "Conv3d", "Linear"]
    in_channels: PositiveInt
    out_channels: PositiveInt
    input_size: list[PositiveInt] = Field(min_length=1)
    kernel_size: list[PositiveInt] = Field(default_factory=list)
    stride: list[PositiveInt] = Field(default_factory=list)
    padding: list[NonNegativeInt] | Literal["same", "valid"] = Field(default_factory=list)
    dilation: list[PositiveInt] = Field(default_factory=list)
    groups: PositiveInt = 1
    bias: StrictBool = False
    cost: _Cost
    low: _Cost | None = None
    high: _Cost | None = None
    min: _Cost | None = None
    max: _Cost | None = None
    runs: NonNegativeInt | None = None


class ProfileFile(BaseModel):
    """The schema of a profile file (module docstring): unknown keys, wrong types and strings for booleans
    (``measured: "no"``) are errors, not guesses."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    unit: str = Field(min_length=1)
    measured: StrictBool = False
    source: str = ""
    coefficients: _CoefficientsFile | None = None
    layers: list[_LayerEntry] = Field(default_factory=list)
    device: str | None = None
    torch: str | None = None
    threads: PositiveInt | None = None

    @model_validator(mode="after")
    def _priced(self) -> ProfileFile:
        if self.coefficients is None and not self.layers:
            raise ValueError("give coefficients, layers, or both")
        return self

    @classmethod
    def read(cls, data: Any, where: str) -> ProfileFile:
        """``data`` checked against the schema; raises :class:`ConfigError` naming ``where``, the key and the
        problem on one line."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            key, msg, _ = first_problem(e)
            raise ConfigError(f"{where}: {key}: {msg}") from None


def _table_step(shape: LayerShape) -> int:
    """A quarter of the layer's output channels (at least 1): the difference of two timings is then well above
    their noise, and the slope is still local."""
    return max(1, round(shape.out_channels / 4))


def device_name(device: str) -> str:
    """The name of ``device`` (``cpu`` or ``cuda[:i]``): the GPU's name, or the CPU's model name."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def latency_cache_path(device: str = "cpu", cache_dir: str | Path | None = None) -> Path:
    """The cache file of ``device``'s latency table: one per device name, torch version and (CPU) thread count,
    under ``cache_dir``, ``$NAS_SPLIT_CACHE`` or ``~/.cache/nas_split``, in ``latency/``."""
    base = Path(cache_dir or os.environ.get("NAS_SPLIT_CACHE") or "~/.cache/nas_split").expanduser()
    threads = "" if device.startswith("cuda") else f"-{torch.get_num_threads()}threads"
    return base / "latency" / f"{_slug(device_name(device))}-torch{torch.__version__.split('+')[0]}{threads}.json"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower()


class LatencyTable(CostModel):
    """Measured batch-1 forward latency of each layer shape on ``device``, in ms; a shape is timed the first time it
    is priced (``torch.utils.benchmark``, eval mode, no grad, the median of ``min_run_time`` s of runs) and the
    table is written to :func:`latency_cache_path` after each new entry, so each shape is timed once per machine.

    Each entry keeps the median over the timing blocks of eight copies of the layer and their spread
    (``low``/``high``: the 10th and 90th percentiles; ``min``/``max``: the fastest and slowest block).
    The sum over layers is a prediction of the model's latency: it leaves out norms, activations, pooling and
    the time between kernels (MACs outside conv/linear layers cost 0 here).
    """

    measured = True
    unit = "ms"

    def __init__(self, device: str = "cpu", cache_dir: str | Path | None = None, min_run_time: float = 0.15):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("cost_model latency-cuda needs a GPU; this machine has none")
        self.device, self.min_run_time, self.name = device, min_run_time, device_name(device)
        self.path = latency_cache_path(device, cache_dir)
        self.label = f"latency-{_slug(self.name)}"
        self.source = (f"measured here: torch.utils.benchmark, batch 1, {self.name}, "
                       f"torch {torch.__version__}" + ("" if device.startswith("cuda") else
                                                      f", {torch.get_num_threads()} threads"))
        self.entries: dict[str, dict[str, Any]] = {}
        self.cached = True  # False once the cache could not be written: measured entries then live in memory
        try:
            if self.path.is_file():
                from ._io import read_mapping

                f = ProfileFile.read(read_mapping(self.path, "latency cache"), f"latency cache {str(self.path)!r}")
                self.entries = {LayerShape.from_config(e.model_dump()).key(): e.model_dump(exclude_none=True)
                                for e in f.layers}
        except (ConfigError, OSError) as e:  # a damaged or unreadable cache is measured again
            logging.getLogger(__name__).warning("ignoring the latency cache: %s", e)

    def layer_cost(self, shape: LayerShape) -> float:
        return self.entry(shape)["cost"]

    def channel_cost(self, shape: LayerShape, d_out: int, d_in: int) -> float:
        """The measured slope over :func:`_table_step` channels (one channel's time is below the timing noise),
        at least 0."""
        k = _table_step(shape)
        return max(0.0, (self.layer_cost(shape.grown(k * d_out, k * d_in)) - self.layer_cost(shape)) / k)

    def entry(self, shape: LayerShape) -> dict[str, Any]:
        """The table's entry of ``shape`` (``cost`` = median ms and the spread of :meth:`time`), timed if new."""
        key = shape.key()
        if key not in self.entries:
            self.entries[key] = {**shape.config(), **self.time(shape)}
            self.save()
        return self.entries[key]

    def time(self, shape: LayerShape) -> dict[str, float]:
        """Time :data:`_INSTANCES` freshly built copies of a layer of ``shape`` (two instances of one layer differ
        by a few percent in speed, from where their tensors lie in memory), each with
        ``torch.utils.benchmark.Timer.blocked_autorange`` for a share of ``min_run_time``: ``{cost: median ms per
        call over all blocks, low, high: their 10th and 90th percentiles, min, max: the fastest and slowest block,
        runs: calls}``."""
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils import benchmark

        blocks: list[float] = []
        runs = 0
        for _ in range(_INSTANCES):
            module, x = shape.build()
            module, x = module.to(self.device).eval(), x.to(self.device)
            timer = benchmark.Timer("module(x)", globals={"module": module, "x": x},
                                    num_threads=torch.get_num_threads())
            with torch.no_grad():
                module(x)  # cuDNN's algorithm choice, allocations
                m = timer.blocked_autorange(min_run_time=self.min_run_time / _INSTANCES)
            blocks += m.times
            runs += m.number_per_run * len(m.times)
        q = torch.tensor(blocks, dtype=torch.float64).quantile(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
        low, median, high = (1e3 * v for v in q.tolist())
        return {"cost": median, "low": low, "high": high, "min": 1e3 * min(blocks), "max": 1e3 * max(blocks),
                "runs": runs}

    def save(self) -> None:
        """Write the table (atomically) as a profile file :class:`ProfileModel` can read.  Where the cache cannot be
        written (``$NAS_SPLIT_CACHE`` under a file, a read-only directory) it warns once and the table lives in
        memory: every shape is still timed once per run."""
        from ._io import atomic_write_json

        if not self.cached:
            return
        try:
            atomic_write_json(self.path, {"name": self.label, "unit": self.unit, "measured": True,
                                          "source": self.source, "device": self.name,
                                          "torch": torch.__version__, "layers": list(self.entries.values())})
        except OSError as e:
            self.cached = False
            warnings.warn(f"nas-split: cannot write the latency cache {str(self.path)!r} ({e.strerror or e}); "
                          "measuring without caching (set NAS_SPLIT_CACHE to a writable directory)", stacklevel=2)


def _latency(device: str | None = None) -> LatencyTable:
    return LatencyTable(device or ("cuda" if torch.cuda.is_available() else "cpu"))


#: Cost models by name (the value of ``cost_model:`` in a run or comparison configuration); anything else is
#: read as the path of a profile file.
COST_MODELS = {"horowitz-45nm": EnergyModel, "horowitz-45nm-sram": EnergyModel.sram, "latency": _latency,
               "latency-cpu": lambda: _latency("cpu"), "latency-cuda": lambda: _latency("cuda")}


def check_spec(spec: str) -> None:
    """Raise :class:`ConfigError` unless ``spec`` is a :data:`COST_MODELS` name or an existing file."""
    if spec not in COST_MODELS and not Path(spec).expanduser().is_file():
        raise ConfigError(f"cost_model {spec!r} is neither a known model ({', '.join(COST_MODELS)}) nor a file")


def cost_model(spec: str | CostModel | None = None) -> CostModel:
    """The cost model ``spec`` names: a :data:`COST_MODELS` name, a profile file's path, or a model (returned as
    it is); ``None`` is ``horowitz-45nm``."""
    if isinstance(spec, CostModel):
        return spec
    spec = spec or "horowitz-45nm"
    check_spec(spec)
    return COST_MODELS[spec]() if spec in COST_MODELS else ProfileModel.load(Path(spec).expanduser())
