"""Variance transfer (Yuan, Savarese & Maire, "Accelerated Training via Incrementally Growing Neural Networks
using Variance Transfer and Learning Rate Adaptation", NeurIPS 2023) for any growth step.

A consumer whose fan-in grew from ``F`` to ``F'`` gets its weights (and bias) scaled by ``β = sqrt(F / F')``, so
``fan_in × Var W`` — its output variance for independent unit-variance inputs — is what it was before the growth
once the new inputs carry signal of their own.  The consumer's batch norm absorbs β: running mean × β, running
variance and ε × β², so the normalised values, and the network function, are unchanged in eval and in train mode.
A consumer without a norm that tracks running statistics after it (a classifier) is left alone: nothing would
absorb the scale.

``vt`` (:mod:`baselines.variance_transfer`) scales the old columns and draws its new ones with the rescaled
variance; the splitting methods' ``variance_transfer`` option scales every column, the copies' halves included.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..surgery import CouplingGraph
from .neurons import find_neurons

__all__ = ["fan_in_growth", "transfer_betas", "transfer_variance"]


def fan_in_growth(graph: CouplingGraph, added: Mapping[str, int]) -> dict[str, int]:
    """``{consumer: new input channels}`` when ``added[layer]`` output channels are added to each layer, over the
    consumers that read each channel at one position (a flatten's consumer is not counted)."""
    grows: dict[str, int] = {}
    for layer, k in added.items():
        for s in graph.group(layer).slots:
            if s.role == "consumer" and len(s.positions[0]) == 1 and k:
                grows[s.name] = grows.get(s.name, 0) + k
    return grows


def transfer_betas(model: nn.Module, example_inputs: torch.Tensor, grows: Mapping[str, int],
                   fan_in_before: Mapping[str, int]) -> tuple[dict[str, float], dict[str, nn.Module]]:
    """``β = sqrt(F / (F + grows))`` of each consumer with a running-statistics norm after it, and those norms."""
    norms = {n: nr.norm for n, nr in find_neurons(model, example_inputs, list(grows)).items()}
    norms = {n: m for n, m in norms.items() if m is not None and m.track_running_stats}
    betas = {n: math.sqrt(fan_in_before[n] / (fan_in_before[n] + g)) for n, g in grows.items() if n in norms}
    return betas, norms


@torch.no_grad()
def transfer_variance(model: nn.Module, betas: Mapping[str, float], norms: Mapping[str, nn.Module],
                      columns: Mapping[str, int] | None = None) -> None:
    """Scale each consumer's weights by ``betas[name]`` (only its first ``columns[name]`` input columns when
    given) and its bias, and let its norm absorb the scale (see the module docstring); in place."""
    modules = dict(model.named_modules())
    for n, b in betas.items():
        m, norm = modules[n], norms[n]
        cols = (columns or {}).get(n, m.weight.shape[1])
        m.weight[:, :cols] *= b
        if m.bias is not None:
            m.bias *= b
        norm.running_mean *= b
        norm.running_var *= b * b
        norm.eps *= b * b
