"""Export and reload grown models without any growth-time state.

``save_grown`` writes one file holding plain data only (loadable with ``torch.load(weights_only=True)``): how
to build the seed architecture (a ``search_spaces`` name and its arguments, recorded by ``search_spaces.create``,
or the name of a factory function), the width of every conv / linear / norm layer, the ``state_dict``, and for
timm models the timm shape string; for an anytime model also its levels (``model.nas_split_levels``, see
:mod:`nas_split.anytime`).  ``load_grown`` builds the seed, resizes its layers, loads the weights and gives the
model its levels back.

Loading never imports or calls code that the file names: a ``space`` spec is looked up in the
``search_spaces`` registry (names registered by code the caller imported), and a ``factory`` spec is built only
from the ``factories`` mapping the caller passes (``{"pkg.mod:fn": fn}``); anything else raises
:class:`~nas_split.errors.UntrustedFileError`.
"""
from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .._io import atomic_torch_save, load_plain
from ..errors import ConfigError, NasSplitError, UntrustedFileError
from ..numerics import evaluating
from .blocks import DEPTH_KEYS, replay_depth
from .sizes import apply_sizes, feature_entries, layer_sizes

__all__ = ["save_grown", "load_grown", "read_grown", "grown_payload", "build_grown", "build_spec", "timm_spec",
           "timm_shape_string", "FORMAT"]

FORMAT = "nas-split-grown/1"


def timm_shape_string(model: nn.Module) -> str:
    """The shape string of ``model`` in the format of ``timm.models.adapt_model_from_string``."""
    return "***".join(f"{k}:[{', '.join(str(d) for d in v.shape)}]" for k, v in model.state_dict().items())


def timm_spec(model: nn.Module) -> dict[str, Any] | None:
    """The spec of a model built by ``timm.create_model`` (its registry name, ``num_classes``, ``in_chans``) if
    rebuilding from it reproduces ``model`` exactly (same outputs on a probe input once grown widths and weights
    are loaded), else ``None``.  Constructor arguments that leave no trace in the weights (an activation, a drop
    rate) cannot be recovered; the probe catches them."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    modules = dict(model.named_modules())
    first = modules.get(cfg.get("first_conv", ""))
    if not cfg.get("architecture") or not hasattr(model, "num_classes") or not hasattr(first, "in_channels"):
        return None
    spec = {"timm": cfg["architecture"], "kwargs": {"num_classes": int(model.num_classes),
                                                    "in_chans": int(first.in_channels)}}
    spec.update(getattr(model, "nas_split_depth", None) or {})  # blocks inserted since (surgery.blocks)
    try:
        rebuilt = build_grown({"spec": spec, "sizes": layer_sizes(model), "state_dict": model.state_dict()})
    except Exception:  # not a timm registry name, or the weights do not fit it
        return None
    x = torch.randn(2, first.in_channels, *cfg.get("input_size", (3, 64, 64))[1:],
                    generator=torch.Generator().manual_seed(0)).to(next(model.parameters()).device)
    with evaluating(model), torch.no_grad():
        same = torch.allclose(model(x), rebuilt.to(x.device).eval()(x), rtol=1e-5, atol=1e-6)
    return spec if same else None


def grown_payload(model: nn.Module, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plain-data description of ``model`` that :func:`save_grown` writes (see there for ``spec``)."""
    spec = spec or getattr(model, "nas_split_spec", None) or timm_spec(model)
    if spec is None:
        raise ConfigError(
            f"save_grown cannot tell how to rebuild this {type(model).__name__}: pass spec={{'factory': "
            "'your_pkg.module:build_fn', 'kwargs': {...}}} (reload with load_grown(path, factories={'your_pkg."
            "module:build_fn': build_fn})), or build it with search_spaces.create or timm.create_model")
    spec = {**spec, **(getattr(model, "nas_split_depth", None) or {})}  # its depth (surgery.blocks)
    try:
        json.dumps(spec)
    except TypeError as e:
        raise ConfigError(f"spec must hold plain JSON values to reload with weights_only=True: {e}") from None
    payload = {"format": FORMAT, "spec": spec, "sizes": layer_sizes(model),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "timm_shape_string": timm_shape_string(model) if hasattr(model, "pretrained_cfg") else None,
               "feature_chs": [int(e["num_chs"]) for e in feature_entries(model)]}
    if getattr(model, "nas_split_levels", None) is not None:  # an anytime model's levels (nas_split.anytime)
        payload["levels"] = _on_cpu(model.nas_split_levels)
    return payload


def _on_cpu(obj: Any) -> Any:
    """``obj`` (plain data: dicts, lists, numbers, tensors) with every tensor detached and on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_on_cpu(v) for v in obj]
    return obj


def save_grown(model: nn.Module, path: str | os.PathLike, spec: dict[str, Any] | None = None) -> None:
    """Write ``model``'s architecture and weights to ``path`` (atomically).

    Args:
        spec: how to build the seed: ``{"space": name, "num_classes", "in_chans", "input_size", "kwargs"}``
            (recorded by ``search_spaces.create`` as ``model.nas_split_spec``), ``{"timm": name, "kwargs":
            {...}}`` (inferred for a ``timm.create_model`` model, see :func:`timm_spec`), or ``{"factory":
            "package.module:function", "kwargs": {...}}`` (reloaded only with ``load_grown(path,
            factories={"package.module:function": function})``).  JSON-serialisable values only.
    """
    atomic_torch_save(path, grown_payload(model, spec))


Factories = Mapping[str, Callable[..., nn.Module]]


def build_spec(spec: dict[str, Any], factories: Factories | None = None, import_factory: bool = False) -> nn.Module:
    """The model a ``spec`` (see :func:`save_grown`) describes, freshly initialised: the seed, deepened as its
    ``stage_depths`` / ``inserted_layers`` say (:func:`~.blocks.replay_depth`) when it has them.

    Args:
        factories: ``{"pkg.mod:fn": callable}``: the factory specs the caller allows, by name.
        import_factory: import and call a ``factory`` spec's function by its name; only for a spec that comes
            from the caller's own code (e.g. :class:`nas_split.nni.space.BackboneSpace`), never from a file.

    Raises:
        UntrustedFileError: a factory spec that is neither in ``factories`` nor allowed by ``import_factory``.
        NasSplitError: a spec of neither form.
    """
    model = _seed(spec, factories, import_factory)
    if any(k in spec for k in DEPTH_KEYS):  # blocks or layers inserted (surgery.blocks): rebuilt in place
        replay_depth(model, spec)
    return model


def _seed(spec: dict[str, Any], factories: Factories | None, import_factory: bool) -> nn.Module:
    if not isinstance(spec, Mapping) or not isinstance(spec.get("kwargs", {}), Mapping):
        raise NasSplitError(f"spec must be a mapping with a 'kwargs' mapping, got {spec!r}")
    kwargs = dict(spec.get("kwargs", {}))
    if "space" in spec:
        import search_spaces

        return search_spaces.create(spec["space"], spec["num_classes"], spec["in_chans"], spec.get("input_size"),
                                    **kwargs)
    if "timm" in spec:  # a name in timm's registry (nas-split's own timm models register with search_spaces)
        import timm

        import search_spaces  # noqa: F401

        return timm.create_model(spec["timm"], pretrained=False, **kwargs)
    name = spec.get("factory")
    if not isinstance(name, str):
        raise NasSplitError("spec names neither a search space ('space'), a timm model ('timm') nor a factory "
                            "('factory')")
    if factories is not None and name in factories:
        return factories[name](**kwargs)
    if not import_factory:
        raise UntrustedFileError(f"the model is built by factory {name!r}, and nas-split never imports or calls "
                                 f"code named in a file; if you trust it, pass factories={{{name!r}: <the function>}}")
    mod, _, fn = name.partition(":")
    return getattr(importlib.import_module(mod), fn)(**kwargs)


def load_grown(path: str | os.PathLike, map_location: str | torch.device = "cpu",
               factories: Factories | None = None) -> nn.Module:
    """Rebuild a model written by :func:`save_grown` (``torch.load(weights_only=True)``).

    Args:
        factories: for a file whose spec names a factory: ``{"pkg.mod:fn": fn}``, the functions you allow to
            build it (nothing named in the file is imported or called otherwise).

    Raises:
        NasSplitError: not a nas-split grown-model file, or unreadable.
        UntrustedFileError: the file names a factory that ``factories`` does not allow.
    """
    return build_grown(read_grown(path, map_location), factories)


def read_grown(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The :func:`grown_payload` held by ``path`` (``torch.load(weights_only=True)``, nothing built): a
    :func:`save_grown` file or a ``nas-split grow`` checkpoint (whose ``model`` entry is one).

    Raises:
        NasSplitError: unreadable, or neither kind of file.
    """
    payload = load_plain(path, "grown-model file", map_location)
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):  # a grow checkpoint
        payload = payload["model"]
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise NasSplitError(f"{path}: not a nas-split grown-model file")
    return payload


def build_grown(payload: dict[str, Any], factories: Factories | None = None) -> nn.Module:
    """Rebuild a model from :func:`grown_payload`'s description (``factories`` as in :func:`load_grown`)."""
    model = build_spec(payload["spec"], factories)
    apply_sizes(model, payload["sizes"])
    model.load_state_dict(payload["state_dict"])
    for e, c in zip(feature_entries(model), payload.get("feature_chs", []), strict=False):
        e["num_chs"] = c
    model.nas_split_spec = payload["spec"]
    if payload.get("levels") is not None:
        model.nas_split_levels = payload["levels"]
    return model
