"""GradMax (Evci et al., ICLR 2022): new neurons with zero fan-in whose fan-out maximises the fan-in gradient.

With zero fan-in the new neurons output ``σ(0) = 0`` and the function is unchanged whatever the fan-out ``B``.
The gradient of the loss w.r.t. the new fan-in is linear in ``B``:  ``∇ = σ'(0) Bᵀ G`` with
``G = E[Σ_positions ∂L/∂z_c ⊗ p]`` (``z_c`` the consumer's output, ``p`` the grown layer's input patches, mapped
to the consumer's input positions through an identity-initialised depthwise conv if there is one).  ``‖∇‖_F`` is
maximised under ``‖B‖_F ≤ c`` by the top-k left singular vectors of ``G`` (as a ``fan-out x fan-in`` matrix).
``G`` is computed as the consumer's weight gradient for an input whose channels are ``p`` — no auxiliary layer.

A linear consumer behind global pooling sees the positions' mean: exact for average pooling; for max pooling
(PointNet) the new channel is 0 at every position, all positions tie, and their mean is the symmetric choice.

ReLU-family activations have ``σ'(0) = 0`` in PyTorch, so the new neurons would never leave zero; the new
channels' norm bias is raised by ``bias_offset`` (default 1e-6) to sit in the linear region, which changes the
output by at most ``|B| · 1e-6``.  New fan-out columns are unit-norm times ``scale`` x the mean norm of the
existing columns (``scale_method="mean_norm"``, GradMax's WRN setting) or ``scale`` (``"fixed"``).

Under batch norm (our Conv → BN → act order) the new channels' norm entries are made the identity on the data in
train mode too (:mod:`baselines.norm_init`), else the norm rescales a channel whose fan-in just left zero to unit
variance at once (the published MobileNet code places BN after the activation; its WRN runs use no norm).
"""
from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nas_split.distributed import all_reduce_sum, batch_share, world_size
from nas_split.growth.channel_cost import prefix_within_macs
from nas_split.growth.neurons import find_neurons, splittable_layers
from nas_split.numerics import evaluating, full_precision, like_model
from nas_split.surgery import CouplingGraph, NewChannels, NotGrowableError, SplitReport, add_channels

from .norm_init import calibrate_new_norms

__all__ = ["GradMaxDirections", "gradmax_layers", "gradmax_counts", "gradmax_matrix", "gradmax_directions",
           "gradmax_grow"]


@dataclass
class GradMaxDirections:
    """Fan-out of ``k`` new channels of ``layer`` for its single consumer, and the singular values of ``G``."""

    layer: str
    consumer: str
    fan_out: torch.Tensor      # (k, *consumer column shape)
    singular_values: torch.Tensor


def _path(graph: CouplingGraph, layer: str):
    group = graph.group(layer)
    consumers = [s for s in group.slots if s.role == "consumer"]
    others = [s for s in group.slots if s.role == "producer"]
    dws = [s for s in group.slots if s.role == "depthwise"]
    if len(consumers) != 1 or others or len(dws) > 1 or len(consumers[0].positions[0]) != 1:
        raise NotGrowableError(f"GradMax needs one consumer of {layer!r}'s channels (no residual ties, flatten, "
                               "or branches)")
    dw = dws[0].module if dws else None
    if dw is not None and (dw.kernel_size[0] % 2 == 0 or dw.padding[0] != dw.kernel_size[0] // 2
                           or dw.dilation[0] != 1):
        raise NotGrowableError(f"GradMax: the depthwise conv after {layer!r} must be odd-sized with 'same' padding")
    return group.slot(layer, "out").module, dw, consumers[0]


def gradmax_layers(model: nn.Module, example_inputs: torch.Tensor) -> list[str]:
    """Splittable layers GradMax can grow: one dense consumer, at most one depthwise conv in between."""
    graph = CouplingGraph(model, example_inputs)
    out = []
    for n in splittable_layers(model, example_inputs):
        try:
            _path(graph, n)
        except NotGrowableError:
            continue
        out.append(n)
    return out


def _patch_map(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input patches of ``layer`` at its output positions: ``(N, D, *out_spatial)`` (or ``(N, D)`` for linear)."""
    if isinstance(layer, nn.Linear):
        return x
    x4 = x.unsqueeze(2) if isinstance(layer, nn.Conv1d) else x
    k = (1, layer.kernel_size[0]) if isinstance(layer, nn.Conv1d) else layer.kernel_size
    s = (1, layer.stride[0]) if isinstance(layer, nn.Conv1d) else layer.stride
    p = (0, layer.padding[0]) if isinstance(layer, nn.Conv1d) else layer.padding
    d = (1, layer.dilation[0]) if isinstance(layer, nn.Conv1d) else layer.dilation
    cols = F.unfold(x4, k, dilation=d, padding=p, stride=s)
    h = (x4.shape[2] + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    w = (x4.shape[3] + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    out = cols.view(x.shape[0], cols.shape[1], h, w)
    return out.squeeze(2) if isinstance(layer, nn.Conv1d) else out


@full_precision()
def gradmax_matrix(model: nn.Module, example_inputs: torch.Tensor, layer: str, loader: Iterable,
                   loss_fn: Callable = F.cross_entropy, batches: int = 1) -> tuple[torch.Tensor, str]:
    """``G`` of ``layer`` as a ``(fan-out size, fan-in size)`` matrix, summed over ``batches`` (mean loss each; under
    several processes, of the whole batch: the processes' shares are added)."""
    graph = CouplingGraph(model, example_inputs)
    root, dw, consumer = _path(graph, layer)
    cons = consumer.module
    store: dict[str, torch.Tensor] = {}

    def grab_grad(_m, _i, out) -> None:  # a forward hook must return None, or it replaces the output
        out.register_hook(lambda g: store.__setitem__("g", g))

    hooks = [root.register_forward_hook(lambda m, i, o: store.__setitem__("x", i[0].detach())),
             cons.register_forward_hook(grab_grad)]
    g_total = None
    try:
        with evaluating(model):
            for x, y in itertools.islice(loader, batches):
                x, y = like_model(model, x), like_model(model, y)
                loss = loss_fn(model(x), y)
                torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
                pmap = _patch_map(root, store["x"])
                if dw is not None:  # identity depthwise filter: picks every stride-th position
                    pmap = pmap[(..., *[slice(None, None, s) for s in dw.stride])]
                grad = store["g"]
                if isinstance(cons, nn.Linear):
                    if pmap.dim() > 2:  # pooled over positions before the linear consumer (see module docstring)
                        pmap = pmap.flatten(2).mean(2)
                    g = grad.reshape(-1, grad.shape[-1]).T @ pmap.reshape(-1, pmap.shape[1])
                elif isinstance(cons, nn.Conv1d):
                    g = torch.nn.grad.conv1d_weight(pmap, (cons.out_channels, pmap.shape[1], cons.kernel_size[0]), grad,
                                                    cons.stride, cons.padding, cons.dilation)
                else:
                    g = torch.nn.grad.conv2d_weight(pmap, (cons.out_channels, pmap.shape[1], *cons.kernel_size), grad,
                                                    cons.stride, cons.padding, cons.dilation)
                g = g.movedim(1, -1).reshape(-1, pmap.shape[1])  # (out * kernel, D): fan-out coordinates x fan-in
                if world_size() > 1:  # this process's share of the whole batch's mean-loss gradient
                    g = g * batch_share(len(y), g.device)
                g_total = g if g_total is None else g_total + g
    finally:
        for h in hooks:
            h.remove()
    return all_reduce_sum(g_total), consumer.name


def gradmax_directions(model: nn.Module, example_inputs: torch.Tensor, layer: str, k: int, loader: Iterable,
                       loss_fn: Callable = F.cross_entropy, batches: int = 1, scale: float = 0.5,
                       scale_method: str = "mean_norm") -> GradMaxDirections:
    """Fan-outs of ``k`` new neurons: the top-k left singular vectors of ``G``, scaled (see module docstring)."""
    g, consumer = gradmax_matrix(model, example_inputs, layer, loader, loss_fn, batches)
    u, sv, _ = torch.linalg.svd(g.double(), full_matrices=False)
    k = min(k, u.shape[1])
    cons = dict(model.named_modules())[consumer]
    col_shape = tuple(cons.weight[:, 0].shape)
    cols = u[:, :k].T.to(cons.weight.dtype)  # unit norm
    if scale_method == "mean_norm":
        mag = scale * cons.weight.detach().movedim(1, 0).flatten(1).norm(dim=1).mean()
    elif scale_method == "fixed":
        mag = scale
    else:
        raise ValueError(f"scale_method must be 'mean_norm' or 'fixed', got {scale_method!r}")
    fan_out = (cols * mag).reshape(k, *col_shape)
    return GradMaxDirections(layer, consumer, fan_out, sv[:k].float())


def gradmax_counts(model: nn.Module, example_inputs: torch.Tensor, grow_ratio: float,
                   max_macs: float | None = None) -> dict[str, int]:
    """New neurons per layer: ``⌊grow_ratio × width⌋`` (at least 1) for every layer GradMax can grow, or, with
    ``max_macs``, every layer grown by the same fraction of its width until the next neuron would pass the budget
    (the selection the other growth methods make with ``max_macs``)."""
    modules = dict(model.named_modules())
    widths = {n: modules[n].weight.shape[0] for n in gradmax_layers(model, example_inputs)}
    if max_macs is None:
        return {n: max(1, int(grow_ratio * w)) for n, w in widths.items()}
    order = sorted(((j + 1) / w, n) for n, w in widths.items() for j in range(w))
    k = prefix_within_macs(model, example_inputs, [(n, 1) for _, n in order], max_macs)
    return dict(Counter(n for _, n in order[:k]))


def gradmax_grow(model: nn.Module, example_inputs: torch.Tensor, counts: dict[str, int], loader: Iterable,
                 loss_fn: Callable = F.cross_entropy, optimizer: torch.optim.Optimizer | None = None,
                 bias_offset: float = 1e-6, calibrate_norms: bool = True, **kw) -> SplitReport:
    """Add ``counts[layer]`` GradMax neurons to each layer (zero fan-in, SVD fan-out), in place.

    With ``calibrate_norms`` the new channels' batch-norm entries are the identity on the data in train mode too
    (:func:`~baselines.norm_init.calibrate_new_norms`: ``γ = √ε`` for a zero fan-in), so the first steps do not
    rescale them to unit variance."""
    dirs = {n: gradmax_directions(model, example_inputs, n, c, loader, loss_fn, **kw) for n, c in counts.items()}
    additions = {n: NewChannels(d.fan_out.shape[0], fan_out={d.consumer: d.fan_out}) for n, d in dirs.items()}
    report = add_channels(model, example_inputs, additions, optimizer=optimizer)
    if calibrate_norms:
        calibrate_new_norms(model, example_inputs, {n: d.fan_out.shape[0] for n, d in dirs.items()}, loader)
    if bias_offset:
        neurons = find_neurons(model, example_inputs, list(dirs))
        for n, d in dirs.items():
            nr = neurons[n]
            target = nr.norm.bias if nr.norm is not None and nr.norm.bias is not None else nr.layer.bias
            if target is not None:  # new channels are the last ones of the layer and its norm
                with torch.no_grad():
                    target[-d.fan_out.shape[0]:] += bias_offset
    return report
