"""Random growth, the control of every splitting paper: split random neurons in random directions (S2D weights)."""
from __future__ import annotations

import torch
from torch import nn

from nas_split.growth.channel_cost import prefix_within_macs
from nas_split.growth.neurons import splittable_layers
from nas_split.surgery import SplitReport, split

__all__ = ["random_grow"]


def random_grow(model: nn.Module, example_inputs: torch.Tensor, grow_ratio: float, eps: float = 1e-2,
                optimizer: torch.optim.Optimizer | None = None,
                generator: torch.Generator | None = None, max_macs: float | None = None) -> SplitReport:
    """Split ``⌊grow_ratio x neurons⌋`` neurons drawn uniformly from the splittable layers, in place.

    With ``max_macs`` the random order is followed until the next split would take the model past it.
    """
    gen = generator or torch.Generator().manual_seed(0)
    widths = {n: nr.layer.weight.shape[0] for n, nr in splittable_layers(model, example_inputs).items()}
    pool = [(n, c) for n, w in widths.items() for c in range(w)]
    pick = torch.randperm(len(pool), generator=gen).tolist()
    if max_macs is None:
        pick = pick[:int(grow_ratio * len(pool))]
    else:
        pick = pick[:prefix_within_macs(model, example_inputs, [(pool[i][0], 1) for i in pick], max_macs)]
    plan: dict[str, list[int]] = {}
    for i in sorted(pick):
        n, c = pool[i]
        plan.setdefault(n, []).append(c)
    return split(model, example_inputs, plan, eps=eps, optimizer=optimizer, generator=gen)
