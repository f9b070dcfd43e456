"""Growable backbones for nas-split, in a registry.

``create(name, num_classes, in_chans, input_size, **kwargs)`` builds one, ``list()`` names them all, and
:func:`register` adds a user's own space.  Registered: MobileNetV1/V2 on timm blocks (``mobilenetv1``,
``mobilenetv2`` with per-layer widths; small-input ``*_cifar_*`` variants; ``test_*`` tiny models), PointNet
variants and an MLP; every timm ``mobilenetv1_*`` / ``mobilenetv2_*`` name is available too.
:func:`features` wraps a timm-style backbone (grown or not) as a ``features_only`` feature extractor.
"""
from . import mlp, mobilenet, pointnet  # noqa: F401 - registration side effects
from ._registry import SpaceInfo, UnknownSpaceError, create, info, list, register
from .features import features

__all__ = ["SpaceInfo", "UnknownSpaceError", "create", "features", "info", "list", "register"]
