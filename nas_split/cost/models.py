"""Cost models: what one conv/linear layer of a given shape costs on a device, in one unit.

A network's cost is the sum of its conv/linear layers' :meth:`CostModel.layer_cost` plus
:meth:`CostModel.other_cost` of the MACs issued outside them (a T-Net's ``bmm``).  This module holds the interface,
the linear :class:`Coefficients` and the analytic :class:`EnergyModel` (Horowitz ISSCC 2014 constants by
default, an estimate); :mod:`.profiles` reads a device's profile file, :mod:`.latency` measures a table on this
machine, and :mod:`.registry` names them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from .shapes import LayerShape

__all__ = ["CostModel", "Coefficients", "EnergyModel", "table_step"]


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


def table_step(shape: LayerShape) -> int:
    """A quarter of the layer's output channels (at least 1): the difference of two timings is then well above
    their noise, and the slope is still local."""
    return max(1, round(shape.out_channels / 4))
