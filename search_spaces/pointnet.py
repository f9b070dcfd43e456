"""PointNet classifiers (Qi et al., CVPR 2017) with configurable per-layer widths.

Input: a point cloud ``(B, C, N)`` (``C = in_chans`` features per point, e.g. xyz or (x, y, intensity)).
A shared MLP (1x1 ``Conv1d`` + ``BatchNorm1d`` + ReLU per layer) maps every point, a max-pool over points gives a
global feature, and an MLP head (``Linear`` + ``BatchNorm1d`` + ReLU + dropout) classifies it.

Variants: ``pointnet`` (vanilla), ``pointnet_tnet`` (input and feature T-Nets), ``pointnet_lite`` (thin),
``test_pointnet`` (tiny, for tests).  ``widths`` lists the shared-MLP widths then the head widths.
"""
from __future__ import annotations

import torch
from torch import nn

from ._registry import register

__all__ = ["PointNet", "TNet"]


def _shared_mlp(in_chans: int, widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv1d(in_chans, w, 1, bias=False), nn.BatchNorm1d(w), nn.ReLU(inplace=True)]
        in_chans = w
    return nn.Sequential(*layers)


def _head(in_features: int, widths: list[int], num_classes: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(in_features, w, bias=False), nn.BatchNorm1d(w), nn.ReLU(inplace=True)]
        in_features = w
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


class TNet(nn.Module):
    """Predicts a ``k x k`` transform of the per-point features, initialised to the identity."""

    def __init__(self, k: int, widths: tuple[int, ...] = (64, 128, 1024), head: tuple[int, ...] = (512, 256)):
        super().__init__()
        self.k = k
        self.features = _shared_mlp(k, list(widths))
        self.head = _head(widths[-1], list(head), k * k, dropout=0.0)
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.features(x).amax(dim=2)
        eye = torch.eye(self.k, device=x.device, dtype=x.dtype)
        return self.head(g).view(-1, self.k, self.k) + eye


class PointNet(nn.Module):
    """PointNet classifier.

    Args:
        num_classes: classifier outputs.
        in_chans: features per point.
        widths: shared-MLP widths (``stem_layers`` of them come before the feature transform).
        head_widths: hidden widths of the classification head.
        input_transform: apply an input T-Net to the first ``min(3, in_chans)`` coordinates.
        feature_transform: apply a feature T-Net after the first ``stem_layers`` layers.
        dropout: dropout before the last linear layer.
    """

    def __init__(self, num_classes: int = 40, in_chans: int = 3, widths: tuple[int, ...] = (64, 64, 64, 128, 1024),
                 head_widths: tuple[int, ...] = (512, 256), input_transform: bool = False,
                 feature_transform: bool = False, stem_layers: int = 2, dropout: float = 0.3,
                 tnet_scale: float = 1.0):
        super().__init__()
        widths, head_widths = [int(w) for w in widths], [int(w) for w in head_widths]
        if not 1 <= stem_layers < len(widths):
            raise ValueError(f"stem_layers must be in [1, {len(widths) - 1}], got {stem_layers}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        t = [max(8, int(round(c * tnet_scale))) for c in (64, 128, 1024)]
        th = [max(8, int(round(c * tnet_scale))) for c in (512, 256)]
        self.input_tnet = TNet(min(3, in_chans), tuple(t), tuple(th)) if input_transform else None
        self.stem = _shared_mlp(in_chans, widths[:stem_layers])
        self.feature_tnet = TNet(widths[stem_layers - 1], tuple(t), tuple(th)) if feature_transform else None
        self.features = _shared_mlp(widths[stem_layers - 1], widths[stem_layers:])
        self.classifier = _head(widths[-1], head_widths, num_classes, dropout)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Global feature ``(B, widths[-1])`` after the max-pool over points."""
        if self.input_tnet is not None:
            k = self.input_tnet.k
            xyz = torch.bmm(self.input_tnet(x[:, :k]).transpose(1, 2), x[:, :k])
            x = torch.cat([xyz, x[:, k:]], dim=1) if x.shape[1] > k else xyz
        x = self.stem(x)
        if self.feature_tnet is not None:
            x = torch.bmm(self.feature_tnet(x).transpose(1, 2), x)
        return self.features(x).amax(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


def _scaled(widths: tuple[int, ...], mult: float) -> list[int]:
    if not mult > 0:
        raise ValueError(f"width_mult must be > 0, got {mult}")
    return [max(1, int(round(w * mult))) for w in widths]


def _factory(default_widths: tuple[int, ...], default_head: tuple[int, ...], **fixed):
    def fn(num_classes: int, in_chans: int, input_size: int | None = None, width_mult: float = 1.0,
           widths: list[int] | None = None, **kwargs) -> PointNet:
        n = len(default_widths)
        if widths is None:
            widths = _scaled(default_widths, width_mult) + _scaled(default_head, width_mult)
        if len(widths) != n + len(default_head):
            raise ValueError(f"widths must list {n} shared-MLP and {len(default_head)} head widths")
        opts = {**fixed, **kwargs}
        return PointNet(num_classes, in_chans, tuple(widths[:n]), tuple(widths[n:]), **opts)

    return fn


_VANILLA = (64, 64, 64, 128, 1024)
_HEAD = (512, 256)
register("pointnet", input_kind="points", description="PointNet, vanilla shared MLP + max-pool (Qi et al. 2017).")(
    _factory(_VANILLA, _HEAD))
register("pointnet_tnet", input_kind="points", description="PointNet with input and feature T-Nets.")(
    _factory(_VANILLA, _HEAD, input_transform=True, feature_transform=True))
register("pointnet_lite", input_kind="points", description="Thin PointNet (shared MLP 32-256, head 128-64).")(
    _factory((32, 32, 64, 128, 256), (128, 64), dropout=0.2))
register("test_pointnet", input_kind="points", description="Tiny PointNet with an input T-Net, for tests.")(
    _factory((8, 8, 16), (16,), stem_layers=1, dropout=0.0, input_transform=True, tnet_scale=0.125))
