"""First and second derivatives σ'(u), σ''(u) of activations, for splitting matrices.

Exact for SiLU (swish), hard-swish (a.e.), GELU (erf form), tanh and sigmoid.  ReLU has σ'' = 0 almost
everywhere, so it uses the softplus surrogate of the splitting papers, softplus_β(u) = log(1 + e^{βu}) / β with
σ''(u) = β s(βu)(1 − s(βu)) and β = 3 by default (``klightz/splitting``).  ReLU6 = min(max(u, 0), 6) has two
kinks; its surrogate is softplus_β(u) − softplus_β(u − 6).  Identity (a linear neuron) has no curvature.
The first derivative σ' is always the activation's own (a.e.): only the curvature needs a surrogate.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..growth.neurons import LINEAR

__all__ = ["ACTIVATIONS", "first_derivative", "second_derivative"]

def _softplus_dd(u: torch.Tensor, beta: float) -> torch.Tensor:
    s = torch.sigmoid(beta * u)
    return beta * s * (1 - s)


def _silu_dd(u: torch.Tensor, beta: float) -> torch.Tensor:
    s = torch.sigmoid(u)
    return s * (1 - s) * (2 + u * (1 - 2 * s))


def _hardswish_dd(u: torch.Tensor, beta: float) -> torch.Tensor:
    return ((u > -3) & (u < 3)).to(u.dtype) / 3.0


def _gelu_dd(u: torch.Tensor, beta: float) -> torch.Tensor:
    phi = torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
    return phi * (2 - u * u)


def _tanh_dd(u: torch.Tensor, beta: float) -> torch.Tensor:
    t = torch.tanh(u)
    return -2 * t * (1 - t * t)


def _sigmoid_dd(u: torch.Tensor, beta: float) -> torch.Tensor:
    s = torch.sigmoid(u)
    return s * (1 - s) * (1 - 2 * s)


#: activation kind -> σ''(u, β)
ACTIVATIONS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "relu": _softplus_dd,
    "relu6": lambda u, beta: _softplus_dd(u, beta) - _softplus_dd(u - 6.0, beta),
    "silu": _silu_dd,
    "hardswish": _hardswish_dd,
    "gelu": _gelu_dd,
    "tanh": _tanh_dd,
    "sigmoid": _sigmoid_dd,
}

def _gelu_d(u: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(u / math.sqrt(2))) + u * torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)


def _silu_d(u: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(u)
    return s * (1 + u * (1 - s))


#: activation kind -> σ'(u)
FIRST: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": lambda u: (u > 0).to(u.dtype),
    "relu6": lambda u: ((u > 0) & (u < 6)).to(u.dtype),
    "silu": _silu_d,
    "hardswish": lambda u: torch.where(u < -3, 0.0, torch.where(u > 3, 1.0, (2 * u + 3) / 6)).to(u.dtype),
    "gelu": _gelu_d,
    "tanh": lambda u: 1 - torch.tanh(u) ** 2,
    "sigmoid": lambda u: torch.sigmoid(u) * (1 - torch.sigmoid(u)),
    LINEAR: torch.ones_like,
}

def second_derivative(kind: str, u: torch.Tensor, beta: float = 3.0) -> torch.Tensor:
    """σ''(u) for activation ``kind`` (surrogate curvature ``beta`` for ReLU / ReLU6)."""
    if kind == LINEAR:
        return torch.zeros_like(u)
    return ACTIVATIONS[kind](u, beta)


def first_derivative(kind: str, u: torch.Tensor) -> torch.Tensor:
    """σ'(u) for activation ``kind`` (the activation's own derivative, no surrogate)."""
    return FIRST[kind](u)
