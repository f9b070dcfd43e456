"""Layer shapes: one conv/linear layer as it runs on one sample, the unit every cost model prices.

A :class:`LayerShape` holds the layer's configuration, its input's shape (batch dim dropped) and its counted
figures (MACs, float32 bytes of weight, bias, input and output); :meth:`LayerShape.grown` is the same layer with
more channels, so a cost model can price one more channel exactly.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

__all__ = ["LayerShape", "layer_shape", "BYTES"]

#: bytes of one float32 value
BYTES = 4
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
              "weight_bytes": module.weight.numel() * BYTES,
              "bias_bytes": module.bias.numel() * BYTES if bias else 0,
              "input_bytes": math.prod(input_size) * BYTES, "output_bytes": output_numel * BYTES}
    if isinstance(module, nn.Linear):
        return LayerShape("Linear", module.in_features, module.out_features, **common)
    op = next(n for n, c in _OPS.items() if isinstance(module, c))
    return LayerShape(op, module.in_channels, module.out_channels, kernel_size=tuple(module.kernel_size),
                      stride=tuple(module.stride),
                      padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
                      dilation=tuple(module.dilation), groups=module.groups, **common)
