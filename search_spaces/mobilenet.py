"""MobileNetV1/V2 builders on timm's ``EfficientNet`` blocks, with per-layer seed widths and small-input strides.

The models are timm models: the same module names (``conv_stem``, ``blocks.i.j.conv_dw``/``conv_pw``/``conv_pwl``,
``bn1``..``bn3``, ``classifier``), built with timm's ``decode_arch_def`` and ``build_model_with_cfg``, and
registered with ``timm.models.register_model`` so that ``timm.create_model("mobilenetv1_cifar_100")`` works.

Widths are given per layer: ``widths[0]`` is the stem, then one entry per block (the block's output channels), then
for MobileNetV2 the head conv.  ``width_mult`` scales timm's defaults (rounded to multiples of 8 as timm does).

Small-input variants (``*_cifar_*``) use the stride-1 stem of CIFAR MobileNets and drop the earliest stride-2
stages until the total stride suits the input: ``total_stride = clamp(2**floor(log2(img_size / 4)), 1, 8)``, so
a 32 px input ends on a 4x4 map and an 8 px input on a 4x4 map instead of timm's 1x1.
"""
from __future__ import annotations

import math
from functools import partial

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._efficientnet_builder import decode_arch_def, resolve_act_layer, resolve_bn_args, round_channels
from timm.models.efficientnet import EfficientNet
from torch import nn

from ._registry import register
from .features import features

__all__ = ["MBV1_STAGES", "MBV2_STAGES", "TIMM_MODELS", "base_widths", "small_input_stride", "gen_mobilenet"]

# (block type, output channels, repeats, stride of the first block, expansion ratio) -- timm's arch_def
MBV1_STAGES = (("dsa", 64, 1, 1, 1), ("dsa", 128, 2, 2, 1), ("dsa", 256, 2, 2, 1), ("dsa", 512, 6, 2, 1),
               ("dsa", 1024, 2, 2, 1))
MBV2_STAGES = (("ds", 16, 1, 1, 1), ("ir", 24, 2, 2, 6), ("ir", 32, 3, 2, 6), ("ir", 64, 4, 2, 6),
               ("ir", 96, 3, 1, 6), ("ir", 160, 3, 2, 6), ("ir", 320, 1, 1, 6))
_STEM = 32
_MBV2_HEAD = 1280


def base_widths(stages: tuple, head: int | None, depths: list[int] | None = None, width_mult: float = 1.0) -> list[int]:
    """timm's default per-layer widths (stem, blocks..., [head]) scaled by ``width_mult`` and rounded to 8."""
    depths = depths or [s[2] for s in stages]
    widths = [round_channels(_STEM, width_mult)]
    for (_, chs, _, _, _), rep in zip(stages, depths, strict=True):
        widths += [round_channels(chs, width_mult)] * rep
    if head:
        widths.append(max(head, round_channels(head, width_mult)))  # timm keeps the head >= 1280
    return widths


def small_input_stride(img_size: int) -> int:
    """Total stride for a small input: the largest power of two <= img_size / 4, clamped to [1, 8]."""
    return int(min(8, max(1, 2 ** math.floor(math.log2(max(img_size, 4) / 4)))))


def _stage_strides(stages: tuple, total_stride: int) -> tuple[int, list[int]]:
    """Stem stride and per-stage strides whose product is ``total_stride``: the last stride-2 points are kept."""
    n = math.log2(total_stride)
    points = 1 + sum(s[3] == 2 for s in stages)  # the stem and every stride-2 stage
    if n != int(n) or not 0 <= n <= points:
        raise ValueError(f"total_stride must be a power of two between 1 and {2 ** points}, got {total_stride}")
    keep = [False] * (points - int(n)) + [True] * int(n)
    stem_stride, strides, k = (2 if keep[0] else 1), [], 1
    for s in stages:
        if s[3] == 2:
            strides.append(2 if keep[k] else 1)
            k += 1
        else:
            strides.append(1)
    return stem_stride, strides


def gen_mobilenet(variant: str, stages: tuple, head: int | None, *, width_mult: float = 1.0,
                  widths: list[int] | None = None, depths: list[int] | None = None, total_stride: int = 32,
                  pretrained: bool = False, **kwargs) -> EfficientNet:
    """Build a MobileNetV1 (``head=None``) or V2 (``head=1280``) with explicit per-layer widths.

    Args:
        variant: the timm variant name recorded in the model's ``pretrained_cfg``.
        stages: ``MBV1_STAGES`` or ``MBV2_STAGES``.
        head: width of the 1x1 head conv (MobileNetV2) or ``None`` (MobileNetV1 has none).
        width_mult: scales timm's default widths when ``widths`` is not given.
        widths: per-layer output channels ``[stem, block_0, ..., block_n, (head)]``.
        depths: blocks per stage (default: timm's).
        total_stride: product of all strides (32 = timm's ImageNet layout).
        **kwargs: passed to timm's ``EfficientNet`` (``num_classes``, ``in_chans``, ``act_layer``, ``drop_rate``...);
            ``features_only=True`` (with ``out_indices``, ``feature_cls``) returns the feature extractor
            :func:`search_spaces.features` builds, one level per remaining stride.
    """
    if pretrained:
        raise ValueError("nas-split never loads pretrained weights (growth starts from a seed); use pretrained=False")
    features_only = kwargs.pop("features_only", False)
    feature_opts = {k: kwargs.pop(k) for k in ("out_indices", "feature_cls") if k in kwargs}
    if not width_mult > 0:
        raise ValueError(f"{variant}: width_mult must be > 0, got {width_mult}")
    depths = list(depths or [s[2] for s in stages])
    if len(depths) != len(stages) or min(depths) < 1:
        raise ValueError(f"depths must list {len(stages)} positive block counts, got {depths}")
    expected = base_widths(stages, head, depths, width_mult)
    if widths is None:
        widths = expected
    widths = [int(w) for w in widths]
    if len(widths) != len(expected) or min(widths) < 1:
        raise ValueError(f"{variant}: widths must list {len(expected)} positive layer widths "
                         f"(stem, {sum(depths)} blocks{', head' if head else ''}), got {len(widths)}")
    stem_stride, strides = _stage_strides(stages, total_stride)
    arch_def, i = [], 1
    for (btype, _, _, _, exp), rep, stride in zip(stages, depths, strides, strict=True):
        stage = []
        for j in range(rep):
            e = f"_e{exp}" if btype == "ir" else ""
            stage.append(f"{btype}_r1_k3_s{stride if j == 0 else 1}{e}_c{widths[i]}")
            i += 1
        arch_def.append(stage)
    model = build_model_with_cfg(
        EfficientNet, variant, pretrained=False,
        block_args=decode_arch_def(arch_def),
        num_features=widths[-1] if head else 0,
        stem_size=widths[0], fix_stem=True,
        round_chs_fn=partial(round_channels, multiplier=None),  # widths are exact
        norm_layer=kwargs.pop("norm_layer", None) or partial(nn.BatchNorm2d, **resolve_bn_args(kwargs)),
        act_layer=resolve_act_layer(kwargs, "relu6"),
        **kwargs,
    )
    if stem_stride == 1:  # timm's EfficientNet stem is stride 2; a k3 conv with padding 1 runs the same at stride 1
        model.conv_stem.stride = (1, 1)
        for f in model.feature_info:
            f["reduction"] //= 2
    return features(model, **feature_opts) if features_only else model


def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (4, 4), "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.25,) * 3, "first_conv": "conv_stem",
            "classifier": "classifier", "license": "mit", **kwargs}


default_cfgs = generate_default_cfgs({
    "mobilenetv1.untrained": _cfg(input_size=(3, 224, 224), pool_size=(7, 7)),
    "mobilenetv2.untrained": _cfg(input_size=(3, 224, 224), pool_size=(7, 7)),
    "mobilenetv1_cifar_025.untrained": _cfg(),
    "mobilenetv1_cifar_050.untrained": _cfg(),
    "mobilenetv1_cifar_100.untrained": _cfg(),
    "mobilenetv2_cifar_050.untrained": _cfg(),
    "mobilenetv2_cifar_100.untrained": _cfg(),
    "test_mobilenetv1.untrained": _cfg(input_size=(3, 16, 16)),
    "test_mobilenetv2.untrained": _cfg(input_size=(3, 16, 16)),
})

_TEST_V2_DEPTHS = [1, 1, 2, 1, 1, 1, 1]


def _v1(variant: str, img_size: int | None, default_mult: float, small: bool, **kwargs) -> EfficientNet:
    stride = kwargs.pop("total_stride", None) or (small_input_stride(img_size or 32) if small else 32)
    kwargs.setdefault("width_mult", default_mult)
    return gen_mobilenet(variant, MBV1_STAGES, None, total_stride=stride, **kwargs)


def _v2(variant: str, img_size: int | None, default_mult: float, small: bool, **kwargs) -> EfficientNet:
    stride = kwargs.pop("total_stride", None) or (small_input_stride(img_size or 32) if small else 32)
    kwargs.setdefault("width_mult", default_mult)
    return gen_mobilenet(variant, MBV2_STAGES, _MBV2_HEAD, total_stride=stride, **kwargs)


#: Names this module registers with timm (``timm.create_model(name)`` builds them); filled by :func:`_timm_model`.
TIMM_MODELS: list[str] = []


def _space(entry):
    def fn(num_classes: int, in_chans: int, input_size: int | None = None, **kwargs) -> nn.Module:
        if input_size is not None:
            kwargs["img_size"] = input_size
        return entry(num_classes=num_classes, in_chans=in_chans, **kwargs)

    fn.__doc__ = entry.__doc__
    return fn


def _timm_model(fn):
    """Register ``fn`` with timm (``timm.models.register_model``) and as a search space; record it in
    :data:`TIMM_MODELS`."""
    TIMM_MODELS.append(fn.__name__)
    register(fn.__name__, input_kind="image")(_space(fn))
    return register_model(fn)


@_timm_model
def mobilenetv1(pretrained: bool = False, img_size: int | None = None, **kwargs) -> EfficientNet:
    """MobileNetV1, timm layout (total stride 32), configurable ``width_mult`` / per-layer ``widths``."""
    return _v1("mobilenetv1", img_size, 1.0, False, pretrained=pretrained, **kwargs)


@_timm_model
def mobilenetv2(pretrained: bool = False, img_size: int | None = None, **kwargs) -> EfficientNet:
    """MobileNetV2, timm layout (total stride 32), configurable ``width_mult`` / per-layer ``widths``."""
    return _v2("mobilenetv2", img_size, 1.0, False, pretrained=pretrained, **kwargs)


@_timm_model
def mobilenetv1_cifar_025(pretrained: bool = False, img_size: int | None = 32, **kwargs) -> EfficientNet:
    """MobileNetV1 x0.25 for 8-32 px inputs (stride-1 stem, total stride <= 8)."""
    return _v1("mobilenetv1_cifar_025", img_size, 0.25, True, pretrained=pretrained, **kwargs)


@_timm_model
def mobilenetv1_cifar_050(pretrained: bool = False, img_size: int | None = 32, **kwargs) -> EfficientNet:
    """MobileNetV1 x0.5 for 8-32 px inputs (stride-1 stem, total stride <= 8)."""
    return _v1("mobilenetv1_cifar_050", img_size, 0.5, True, pretrained=pretrained, **kwargs)


@_timm_model
def mobilenetv1_cifar_100(pretrained: bool = False, img_size: int | None = 32, **kwargs) -> EfficientNet:
    """MobileNetV1 x1.0 for 8-32 px inputs (stride-1 stem, total stride <= 8)."""
    return _v1("mobilenetv1_cifar_100", img_size, 1.0, True, pretrained=pretrained, **kwargs)


@_timm_model
def mobilenetv2_cifar_050(pretrained: bool = False, img_size: int | None = 32, **kwargs) -> EfficientNet:
    """MobileNetV2 x0.5 for 8-32 px inputs (stride-1 stem, total stride <= 8)."""
    return _v2("mobilenetv2_cifar_050", img_size, 0.5, True, pretrained=pretrained, **kwargs)


@_timm_model
def mobilenetv2_cifar_100(pretrained: bool = False, img_size: int | None = 32, **kwargs) -> EfficientNet:
    """MobileNetV2 x1.0 for 8-32 px inputs (stride-1 stem, total stride <= 8)."""
    return _v2("mobilenetv2_cifar_100", img_size, 1.0, True, pretrained=pretrained, **kwargs)


@_timm_model
def test_mobilenetv1(pretrained: bool = False, img_size: int | None = 16, **kwargs) -> EfficientNet:
    """Tiny MobileNetV1 for tests: one block per stage, 8-16 channels."""
    kwargs.setdefault("depths", [1, 1, 1, 1, 1])
    kwargs.setdefault("widths", [8, 8, 8, 16, 16, 16])
    return _v1("test_mobilenetv1", img_size, 1.0, True, pretrained=pretrained, **kwargs)


@_timm_model
def test_mobilenetv2(pretrained: bool = False, img_size: int | None = 16, **kwargs) -> EfficientNet:
    """Tiny MobileNetV2 for tests: 8 blocks (one residual pair), 8-16 channels, 32-channel head."""
    kwargs.setdefault("depths", _TEST_V2_DEPTHS)
    kwargs.setdefault("widths", [8, 8, 8, 8, 8, 16, 16, 16, 16, 32])
    return _v2("test_mobilenetv2", img_size, 1.0, True, pretrained=pretrained, **kwargs)
