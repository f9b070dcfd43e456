"""Registry of growable backbones ("search spaces").

A space is a factory ``fn(num_classes, in_chans, input_size, **kwargs) -> nn.Module`` registered under a name with
:func:`register`.  ``input_size`` is the spatial size of an image (an ``int``) or the number of points of a point
cloud; factories that do not need it ignore it.  Every timm MobileNetV1/V2 name is a space too: it is built by
``timm.create_model(name, pretrained=False)``.
"""
from __future__ import annotations

import builtins
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["SpaceInfo", "register", "create", "list", "info", "UnknownSpaceError"]

#: Input layouts a space can declare: images are (B, C, H, W), point clouds are (B, C, N).
INPUT_KINDS = ("image", "points")
_TIMM_PATTERNS = ("mobilenetv1_*", "mobilenetv2_*")


class UnknownSpaceError(KeyError):
    """Raised for a name that is neither registered nor a timm MobileNetV1/V2."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class SpaceInfo:
    """What a registered space is: its factory, the input layout it expects and a one-line description."""

    name: str
    fn: Callable[..., nn.Module]
    input_kind: str
    description: str


_SPACES: dict[str, SpaceInfo] = {}


def register(name: str | None = None, *, input_kind: str = "image", description: str | None = None) -> Callable:
    """Decorator that registers a backbone factory as a search space.

    Example::

        @search_spaces.register("my_cnn", input_kind="image")
        def my_cnn(num_classes: int, in_chans: int, input_size: int | None = None, width: int = 16) -> nn.Module:
            ...

    Args:
        name: registry name (default: the function's name).
        input_kind: ``"image"`` (B, C, H, W) or ``"points"`` (B, C, N).
        description: one line for listings (default: the first line of the factory's docstring).
    """
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        doc = (fn.__doc__ or "").strip().splitlines()
        _SPACES[key] = SpaceInfo(key, fn, input_kind, description or (doc[0] if doc else ""))
        return fn

    return deco


def _timm_names() -> builtins.list[str]:
    import timm

    return timm.list_models(builtins.list(_TIMM_PATTERNS))


def _is_timm_name(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in _TIMM_PATTERNS) and name in _timm_names()


def list(pattern: str | None = None) -> builtins.list[str]:  # noqa: A001 - public name fixed by the design
    """Names of all spaces (registered ones and timm MobileNetV1/V2), optionally filtered by a glob pattern."""
    names = sorted(set(_SPACES) | set(_timm_names()))
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def info(name: str) -> SpaceInfo:
    """The :class:`SpaceInfo` of ``name``; raises :class:`UnknownSpaceError` with close matches."""
    if name in _SPACES:
        return _SPACES[name]
    if _is_timm_name(name):
        return SpaceInfo(name, _create_timm, "image", f"timm {name} (pretrained=False)")
    import difflib

    close = difflib.get_close_matches(name, list(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `search_spaces.list()`"
    raise UnknownSpaceError(f"unknown backbone {name!r}{hint}")


def _create_timm(num_classes: int, in_chans: int, input_size: int | None = None, *, _name: str, **kwargs) -> nn.Module:
    import timm

    return timm.create_model(_name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


def create(name: str, num_classes: int = 10, in_chans: int = 3, input_size: int | None = None, **kwargs) -> nn.Module:
    """Build the backbone ``name``.

    Args:
        name: a registered space or any timm MobileNetV1/V2 name (never with pretrained weights).
        num_classes: classifier outputs.
        in_chans: input channels (image channels, or per-point features for point clouds).
        input_size: image side in pixels or number of points; small-input MobileNets use it to pick strides.
        **kwargs: space-specific options (``width_mult``, ``widths``, ...).
    """
    space = info(name)
    if space.fn is _create_timm:
        model = _create_timm(num_classes, in_chans, input_size, _name=name, **kwargs)
    else:
        model = space.fn(num_classes=num_classes, in_chans=in_chans, input_size=input_size, **kwargs)
    # how to rebuild the seed (nas_split.save_grown / load_grown)
    model.nas_split_spec = {"space": name, "num_classes": num_classes, "in_chans": in_chans,
                            "input_size": input_size, "kwargs": dict(kwargs)}
    return model
