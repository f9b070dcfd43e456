"""Counting: MACs per sample (``torch.utils.flop_counter``) and the MACs a training run or a decision pass spends.

* **MACs** (counted): multiply-accumulates of convolutions and matrix products per sample, i.e.
  ``torch.utils.flop_counter.FlopCounterMode`` total / 2 (timm ``mobilenetv2_100`` at 224 px: 300.77 M).
  BatchNorm, activations and pooling are not counted.
* **training MACs** (counted, with a rule of thumb): a training step costs :data:`TRAIN_MACS_PER_SAMPLE` = 3
  forward MACs per sample (forward, plus a backward pass that computes input and weight gradients, each about
  one forward).  A stage that trains on ``n`` samples at ``M`` MACs costs ``3 n M`` (:func:`training_macs`);
  the passes a growth or pruning step makes to decide (analysis, scoring) are counted by
  :class:`PassCounter`: ``3 M`` per sample forwarded with gradients on, ``2 M`` where the backward asks for
  input gradients only (:func:`input_gradients_only`: the splitting analysis, no weight gradients), ``M``
  without.  Evaluation is not counted.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..numerics import evaluating, like_model

__all__ = ["count_macs", "first_sample", "TRAIN_MACS_PER_SAMPLE", "INPUT_GRADIENT_MACS_PER_SAMPLE", "training_macs",
           "PassCounter", "input_gradients_only"]

#: Forward-MAC multiples of one training sample: forward + backward (input and weight gradients).
TRAIN_MACS_PER_SAMPLE = 3
#: ... of one sample whose backward computes input gradients only (no weight gradients).
INPUT_GRADIENT_MACS_PER_SAMPLE = 2

_INPUT_GRADIENTS_ONLY: ContextVar[bool] = ContextVar("input_gradients_only", default=False)


@contextmanager
def input_gradients_only() -> Iterator[None]:
    """Mark the forward passes inside as followed by a backward that asks for input (and activation) gradients
    only: :class:`PassCounter` counts them :data:`INPUT_GRADIENT_MACS_PER_SAMPLE` forward MACs per sample."""
    token = _INPUT_GRADIENTS_ONLY.set(True)
    try:
        yield
    finally:
        _INPUT_GRADIENTS_ONLY.reset(token)


def first_sample(example_inputs: torch.Tensor) -> torch.Tensor:
    """The first sample of a batch, kept as a batch of one."""
    return example_inputs[:1]


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, dict[str, int]]:
    """MACs for one sample: the total and a dict ``{module name: MACs}`` over every module that issued any.

    The dict has one entry per leaf module (names as in ``model.named_modules()``); MACs of functional ops
    issued directly by a non-leaf module are under that module's name.
    """
    x = like_model(model, first_sample(example_inputs))
    with evaluating(model), torch.no_grad(), FlopCounterMode(display=False, depth=None) as fc:
        model(x)
    counts = fc.get_flop_counts()
    root = type(model).__name__
    per_name = {}
    for key, ops in counts.items():
        if key == "Global":
            continue
        name = key[len(root) + 1:] if key.startswith(root + ".") else ("" if key == root else key)
        per_name[name] = sum(ops.values()) // 2
    # keep only what each module issued itself: subtract its direct children
    own = {}
    for name, total in per_name.items():
        children = sum(v for n, v in per_name.items() if n != name and n.startswith(f"{name}." if name else "")
                       and "." not in n[len(name) + 1 if name else 0:])
        if total - children > 0:
            own[name] = total - children
    return int(fc.get_total_flops() // 2), own


def training_macs(macs: float, samples: int) -> float:
    """MACs of training a model of ``macs`` MACs per sample on ``samples`` samples: ``3 x samples x macs``."""
    return TRAIN_MACS_PER_SAMPLE * samples * macs


class PassCounter:
    """Counts the samples forwarded through ``model`` inside the ``with`` block, with and without gradients.

    ``macs(m)`` is the cost of those passes at ``m`` MACs per sample: ``3 m`` per sample forwarded with autograd
    on (a backward is assumed to follow), ``2 m`` inside :func:`input_gradients_only` (a backward without weight
    gradients), ``m`` per sample without.  Nested calls of ``model`` (a wrapper calling the model) count once per
    call of ``model`` itself.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.with_grad = 0
        self.input_grad = 0
        self.without_grad = 0

    def _hook(self, _module, args) -> None:
        x = args[0] if args else None
        n = int(x.shape[0]) if torch.is_tensor(x) and x.dim() > 0 else 1
        if not torch.is_grad_enabled():
            self.without_grad += n
        elif _INPUT_GRADIENTS_ONLY.get():
            self.input_grad += n
        else:
            self.with_grad += n

    def __enter__(self) -> PassCounter:
        self._handle = self.model.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def macs(self, macs_per_sample: float) -> float:
        """MACs of the counted passes at ``macs_per_sample``."""
        return training_macs(macs_per_sample, self.with_grad) + macs_per_sample * (
            INPUT_GRADIENT_MACS_PER_SAMPLE * self.input_grad + self.without_grad)
