"""Feature-extractor wrappers for timm-style backbones (``features_only=True``), grown ones included.

timm's :class:`~timm.models.FeatureListNet` / :class:`~timm.models.FeatureDictNet` / ``FeatureHookNet`` wrap a
model whose ``feature_info`` lists one entry per feature level (``module``, ``num_chs``, ``reduction``).  The
MobileNets of :mod:`search_spaces.mobilenet` declare one level per stride that remains in the network: five for
the ImageNet layout (reductions 2..32), four for a small-input variant at 32 px (reductions 1..8), three at
16-31 px.  The default ``out_indices`` are all declared levels, so they always exist.

The wrapper reads ``num_chs`` from ``feature_info``, so that must be current: a grown model's is
(:func:`nas_split.split` refreshes it, :func:`nas_split.load_grown` restores it), and so is that of a model resized
by ``timm.models.adapt_model_from_string`` in the timm nas-split installs (timm #2370); for a model resized by other
means, call :func:`nas_split.surgery.refresh_feature_info` first.
"""
from __future__ import annotations

from collections.abc import Sequence

from timm.models import FeatureDictNet, FeatureHookNet, FeatureListNet
from timm.models._builder import pretrained_cfg_for_features
from torch import nn

__all__ = ["FEATURE_CLASSES", "feature_levels", "features"]

#: ``feature_cls`` names accepted by :func:`features` (timm's own names for them).
FEATURE_CLASSES: dict[str, type[nn.Module]] = {"list": FeatureListNet, "dict": FeatureDictNet,
                                               "hook": FeatureHookNet}


def feature_levels(model: nn.Module) -> list[dict]:
    """The declared feature levels of ``model`` (copies of its ``feature_info`` entries)."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(f"{type(model).__name__} declares no feature_info; it cannot be a features_only backbone")
    return [dict(e) for e in (info.info if hasattr(info, "info") else info)]


def features(model: nn.Module, out_indices: int | Sequence[int] | None = None, feature_cls: str = "list") -> nn.Module:
    """Wrap ``model`` as a timm feature extractor that returns the feature maps of ``out_indices``.

    Args:
        model: a timm-style model with ``feature_info`` (any backbone of this package, grown or not).
        out_indices: indices into the declared levels (negative ones count from the end), or an ``int`` n for the
            last n levels (as in timm); default: all of them.
        feature_cls: ``"list"`` (a list of tensors, timm's default), ``"dict"`` or ``"hook"``.

    The wrapper shares ``model``'s modules (and so its weights); its ``feature_info.channels()`` and
    ``.reduction()`` describe the selected levels.
    """
    levels = feature_levels(model)
    if feature_cls not in FEATURE_CLASSES:
        raise ValueError(f"feature_cls must be one of {', '.join(FEATURE_CLASSES)}, got {feature_cls!r}")
    if out_indices is None:
        out_indices = len(levels)
    if isinstance(out_indices, int):
        out_indices = tuple(range(len(levels) - out_indices, len(levels)))
    out_indices = tuple(int(i) for i in out_indices)
    bad = [i for i in out_indices if not -len(levels) <= i < len(levels)]
    if bad:
        raise ValueError(f"out_indices {bad} do not exist: {type(model).__name__} declares {len(levels)} feature "
                         f"levels (reductions {[e['reduction'] for e in levels]})")
    out_indices = tuple(i % len(levels) for i in out_indices)  # timm keys dict outputs by the index given
    cfg = getattr(model, "pretrained_cfg", None)
    wrapped = FEATURE_CLASSES[feature_cls](model, out_indices=out_indices, flatten_sequential=True)
    if cfg is not None:
        wrapped.pretrained_cfg = wrapped.default_cfg = pretrained_cfg_for_features(cfg)
    return wrapped
