"""Device profiles: a file the user supplies for their device (YAML or JSON), measured or estimated as it says,
read into a :class:`ProfileModel`.  A :class:`~.latency.LatencyTable`'s cache file is such a file, so a table
measured on one machine prices runs on another.

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

from pathlib import Path
from typing import Annotated, Any, Literal

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

from ..errors import ConfigError, first_problem
from .models import Coefficients, CostModel, table_step
from .shapes import LayerShape

__all__ = ["ProfileModel", "ProfileFile"]


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
        """The entries' slope over :func:`table_step` channels where both ends have an entry; else the
        coefficients' exact increase for one channel."""
        k = table_step(shape)
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
        from .._io import read_mapping

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
