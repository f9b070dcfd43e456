"""The search space NNI sees: a ``search_spaces`` backbone whose per-layer sizes are arguments (no mutables)."""
from __future__ import annotations

from typing import Any

import torch
from nni.nas.nn.pytorch import ModelSpace

from ..surgery.export import build_spec
from ..surgery.sizes import apply_sizes

__all__ = ["BackboneSpace"]


class BackboneSpace(ModelSpace):
    """A ``search_spaces`` backbone as an NNI model space without mutables; per-layer sizes are arguments.

    Args:
        spec: how to build the seed (``model.nas_split_spec`` of :func:`search_spaces.create`).
        sizes: ``{layer: [out, in]}`` of a grown stage (:func:`nas_split.surgery.layer_sizes`); the weights
            are then uninitialised until a checkpoint is loaded.
        depth: a deepened stage's depth record (``stage_depths`` / ``inserted_layers``, :mod:`nas_split.surgery.
            blocks`): its blocks are inserted before ``sizes`` apply.
    """

    def __init__(self, spec: dict[str, Any], sizes: dict[str, list[int]] | None = None,
                 depth: dict[str, Any] | None = None):
        super().__init__()
        self.net = build_spec({**spec, **(depth or {})}, import_factory=True)  # the caller's own spec, not a file's
        if sizes:
            apply_sizes(self.net, sizes)
        self.net.nas_split_spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's output for ``x``."""
        return self.net(x)
