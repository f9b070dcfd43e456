"""Architectures without their weights: a grown model's widths, or new widths of a model's layers, rebuilt and
freshly initialised (the *retrain* step of search → export → retrain, and the random-architecture control).

:func:`resized_sizes` says what every coupled layer's ``[out, in]`` becomes when some layers' output widths
change (the coupling groups of :mod:`.graph`: norms, depthwise filters and consumers follow, with the index maps
through flatten and concatenation); :func:`fresh_model` builds a spec at a seed, imposes a ``sizes`` mapping and
initialises the resized layers as the backbone's constructor would (:func:`reinitialize`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .export import Factories, build_spec
from .graph import CouplingGraph, NotGrowableError
from .sizes import apply_sizes, layer_sizes

__all__ = ["width_groups", "resized_sizes", "reinitialize", "fresh_model"]


def width_groups(model: nn.Module, example_inputs: torch.Tensor,
                 graph: CouplingGraph | None = None) -> dict[str, int]:
    """``{root layer: width}`` of every independent output width of ``model``: one entry per coupling group of a
    conv / linear layer whose channels can change (residual-tied producers share one entry; the classifier, whose
    outputs are the model's, has none)."""
    graph = graph or CouplingGraph(model, example_inputs)
    out, seen = {}, set()
    for name in graph.candidates():
        if name in seen:
            continue
        try:
            g = graph.group(name)
        except NotGrowableError:
            continue
        seen.update(g.producers)
        out[name] = g.width
    return out


def resized_sizes(model: nn.Module, example_inputs: torch.Tensor, widths: Mapping[str, int],
                  graph: CouplingGraph | None = None) -> dict[str, list[int]]:
    """:func:`~.sizes.layer_sizes` of ``model`` once the output width of each layer in ``widths`` (roots of
    :func:`width_groups`) is ``widths[layer]``.

    A coupled (module, dimension) that carries each channel at ``k`` positions (a linear layer after a flatten
    reads ``k = H W`` inputs per channel) changes by ``k`` per channel added or removed.
    """
    graph = graph or CouplingGraph(model, example_inputs)
    sizes = layer_sizes(model)
    for layer, w in widths.items():
        if int(w) < 1:
            raise ValueError(f"{layer}: a width must be >= 1, got {w}")
        g = graph.group(layer)
        for slot in g.slots:
            per = len(slot.positions[0])
            delta = (int(w) - g.width) * per
            if slot.dim == "in":
                sizes[slot.name][1] += delta
            elif slot.role in ("norm", "depthwise"):  # in = out
                sizes[slot.name] = [sizes[slot.name][0] + delta] * 2
            else:
                sizes[slot.name][0] += delta
    return sizes


def _is_timm_efficientnet(model: nn.Module) -> bool:
    try:
        from timm.models.efficientnet import EfficientNet
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(model, EfficientNet)


def reinitialize(model: nn.Module, names: set[str] | None = None,
                 constants: Mapping[str, Mapping[str, float]] | None = None) -> None:
    """Initialise modules ``names`` (default: all) of ``model`` as its constructor would.

    A timm ``EfficientNet`` (every MobileNet of :mod:`search_spaces`) is re-initialised whole with timm's
    ``efficientnet_init_weights``, the call its constructor ends with.  Other models: each module's
    ``reset_parameters()`` (PyTorch's default initialisers, which the PointNet and MLP builders keep), then every
    tensor named in ``constants`` (``{module: {tensor: value}}``: e.g. a T-Net's zero-initialised last layer) is
    filled with its constant.  Norm layers' running statistics are reset in both cases.
    """
    modules = dict(model.named_modules())
    chosen = [m for n, m in modules.items() if names is None or n in names]  # module order: reproducible draws
    for m in chosen:
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    if _is_timm_efficientnet(model):
        from timm.models._efficientnet_builder import efficientnet_init_weights

        efficientnet_init_weights(model)
    with torch.no_grad():
        for mname, tensors in (constants or {}).items():
            for tname, value in tensors.items():
                getattr(modules[mname], tname).fill_(value)


def _constants(model: nn.Module, names: set[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for n, m in model.named_modules():
        if n in names:
            for tname, t in m.named_parameters(recurse=False):
                if t.numel() and bool((t == t.flatten()[0]).all()) and not _is_default_constant(m, tname):
                    out.setdefault(n, {})[tname] = float(t.detach().flatten()[0])
    return out


def _is_default_constant(m: nn.Module, tname: str) -> bool:
    # parameters that reset_parameters itself sets to a constant (norm scales and shifts)
    return isinstance(m, nn.modules.batchnorm._NormBase) and tname in ("weight", "bias")


def fresh_model(spec: Mapping, sizes: Mapping[str, list[int]], seed: int,
                factories: Factories | None = None) -> nn.Module:
    """The architecture ``spec`` + ``sizes`` (a :func:`~.export.save_grown` description) with fresh weights.

    ``torch.manual_seed(seed)``, build ``spec`` (:func:`~.export.build_spec`), impose ``sizes``, and
    :func:`reinitialize` the layers whose shape changed, keeping at their constant the tensors the constructor
    set to one (checked on the built model before resizing).
    """
    torch.manual_seed(seed)
    model = build_spec(dict(spec), factories)
    before = layer_sizes(model)
    unknown = sorted(set(sizes) - set(before))
    if unknown:
        raise ValueError(f"sizes name layers the architecture does not have: {', '.join(unknown[:3])}")
    changed = {n for n, s in sizes.items() if list(s) != before[n]}
    constants = _constants(model, changed)
    apply_sizes(model, {n: list(s) for n, s in sizes.items()})
    reinitialize(model, changed, constants)
    model.nas_split_spec = dict(spec)
    return model
