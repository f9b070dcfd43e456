"""Where and how precisely growth computes: full fp32 whatever the global precision settings, on the model's device.

Splitting analysis compares eigenvalues across layers and the growability check compares outputs to 1e-4, so
neither may run in reduced precision.  PyTorch's defaults do not guarantee that: cuDNN convolutions use TF32 by
default (measured: on an H100 ``growable_layers`` dropped 5 of 14 layers and exact ``λ_min`` moved by up to 8 %),
and a caller's ``torch.autocast`` region (e.g. bf16 mixed-precision training) would run every conv and matmul in
bf16.  :func:`full_precision` switches all of that off for its block and restores it afterwards; the analysis, the
growability check, channel costs and the baselines' scoring run inside it.

:func:`like_model` puts example inputs on the model's device, so growth never moves a model (a model trained on a
GPU is analysed, selected on and split there).

:func:`evaluating` runs a block with the model in eval mode (batch norm on its running statistics, no dropout) and
gives every module its own ``training`` flag back afterwards, so a submodule the user froze in eval mode (frozen
batch norm) stays frozen.

:func:`torch_threads` runs a block with a given number of torch threads and gives the caller's count back (float
reductions, hence results bit for bit, depend on the count).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["full_precision", "evaluating", "torch_threads", "model_device", "like_model"]


def _precision_switches() -> list[object]:
    """The backends' ``fp32_precision`` holders of this torch (TF32 / bf16 for fp32 matmuls and convolutions)."""
    holders = []
    for path in ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn"):
        obj = torch.backends
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            holders.append(obj)
    return holders


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Run the block in IEEE fp32: no TF32 (cuBLAS, cuDNN), no bf16 fp32-math (oneDNN), no active autocast.

    Usable as a decorator.  Previous settings are restored on exit, so training keeps whatever precision the
    user chose.
    """
    holders = _precision_switches()
    saved = [h.fp32_precision for h in holders]
    legacy = not holders  # torch < 2.9 has only the allow_tf32 flags
    if legacy:
        flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    else:
        for h in holders:
            h.fp32_precision = "ieee"
    try:
        with contextlib.ExitStack() as stack:
            for device in ("cpu", "cuda"):
                if device == "cpu" or torch.cuda.is_available():
                    stack.enter_context(torch.autocast(device, enabled=False))
            yield
    finally:
        if legacy:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        else:
            for h, v in zip(holders, saved, strict=True):
                h.fp32_precision = v


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model`` in eval mode; yields ``model``.

    On exit, also by an exception, each module gets back its own previous ``training`` flag (not one flag for
    all, which would unfreeze a submodule the user left in eval mode).
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads; the previous count is restored on exit, also by an exception."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); CPU for a model without either."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def like_model(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` on ``model``'s device, a floating ``x`` in the floating dtype of its parameters (float64 under
    Fabric's ``64-true`` precision); a no-op when it is like that already."""
    p = next(model.parameters(), None)
    if p is not None and p.is_floating_point() and x.is_floating_point():
        return x.to(p.device, p.dtype)
    return x.to(model_device(model))
