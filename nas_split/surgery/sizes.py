"""Layer widths of a model: read them, impose them (to rebuild a grown architecture), and keep timm's
``feature_info`` in step with them."""
from __future__ import annotations

import torch
from torch import nn

from ..numerics import evaluating, like_model
from .handlers import handler_for, resize

__all__ = ["layer_sizes", "layer_widths", "apply_sizes", "feature_entries", "refresh_feature_info"]


def layer_sizes(model: nn.Module) -> dict[str, list[int]]:
    """``{name: [out, in]}`` channel counts of every layer with a channel handler (conv, linear, batch norm, ...)."""
    return {n: h.sizes(m) for n, m in model.named_modules() if (h := handler_for(m)) is not None}


def layer_widths(model: nn.Module) -> dict[str, int]:
    """``{name: out}`` of :func:`layer_sizes` without the norms (whose width is their input's): the output channels
    of every conv / linear layer (and any other handled layer type), as stage records keep them."""
    return {n: h.sizes(m)[0] for n, m in model.named_modules()
            if (h := handler_for(m)) is not None and h.kind(m) != "norm"}


def feature_entries(model: nn.Module) -> list[dict]:
    """The entries of a timm model's ``feature_info`` (empty for other models)."""
    info = getattr(model, "feature_info", None) or []
    return list(info.info if hasattr(info, "info") else info)


def apply_sizes(model: nn.Module, sizes: dict[str, list[int]]) -> None:
    """Resize (uninitialised) every layer whose ``[out, in]`` differs from ``sizes``, before loading weights."""
    modules, current = dict(model.named_modules()), layer_sizes(model)
    for name, (out, inp) in sizes.items():
        m = modules[name]
        if current.get(name) == [out, inp]:
            continue
        if handler_for(m).kind(m) in ("norm", "depthwise"):
            resize(m, out=out)  # norms and depthwise convs: in = out
        else:
            resize(m, out=out, inp=inp)


def refresh_feature_info(model: nn.Module, example_inputs: torch.Tensor) -> None:
    """Update ``num_chs`` of a timm model's ``feature_info`` after its widths changed (timm issue #2370)."""
    entries = feature_entries(model)
    if not entries:
        return
    modules = dict(model.named_modules())
    chans, hooks = {}, []
    for e in entries:
        def hook(_m, _i, out, key=e["module"]):
            chans[key] = out.shape[1]
        hooks.append(modules[e["module"]].register_forward_hook(hook))
    try:
        with evaluating(model), torch.no_grad():
            model(like_model(model, example_inputs[:1]))
    finally:
        for h in hooks:
            h.remove()
    for e in entries:
        e["num_chs"] = int(chans.get(e["module"], e["num_chs"]))
