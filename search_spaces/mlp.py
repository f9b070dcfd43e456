"""Multi-layer perceptron on flattened images: the smallest growable space, used by tests and toy problems."""
from __future__ import annotations

from torch import nn

from ._registry import register

__all__ = ["MLP"]


class MLP(nn.Module):
    """``Flatten -> [Linear -> BatchNorm1d -> act] * len(widths) -> Linear``.

    Args:
        num_classes: classifier outputs.
        in_features: flattened input size.
        widths: hidden widths.
        act: activation module class (``nn.ReLU``, ``nn.Tanh``, ``nn.SiLU``, ...).
        norm: add ``BatchNorm1d`` after each hidden linear layer.
    """

    def __init__(self, num_classes: int, in_features: int, widths: tuple[int, ...] = (64, 32),
                 act: type[nn.Module] = nn.ReLU, norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for w in widths:
            layers.append(nn.Linear(in_features, w, bias=not norm))
            if norm:
                layers.append(nn.BatchNorm1d(w))
            layers.append(act())
            in_features = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


_ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def _factory(default_widths: tuple[int, ...]):
    def fn(num_classes: int, in_chans: int, input_size: int | None = None, width_mult: float = 1.0,
           widths: list[int] | None = None, act: str = "relu", norm: bool = True) -> MLP:
        if input_size is None:
            raise ValueError("mlp needs input_size (the image side) to size its first layer")
        if act not in _ACTS:
            raise ValueError(f"act must be one of {sorted(_ACTS)}, got {act!r}")
        if not width_mult > 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        widths = widths or [max(1, round(w * width_mult)) for w in default_widths]
        return MLP(num_classes, in_chans * input_size * input_size, tuple(widths), _ACTS[act], norm)

    return fn


register("mlp", description="MLP on flattened images (hidden 256-128).")(_factory((256, 128)))
register("test_mlp", description="Tiny MLP for tests (hidden 16-8).")(_factory((16, 8)))
