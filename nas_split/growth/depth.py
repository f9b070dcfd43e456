"""Growing in depth: a new block or layer that keeps the network's function, in train and eval mode.

Where it goes and what it is comes from :mod:`nas_split.surgery.blocks` (a stride-1 block of a timm MobileNet
stage, or a ``layer, norm, activation`` triple of a stack such as PointNet's); this module sets its weights so
that the deepened network computes what the network did (:func:`deepen`), in one of two ways.

**Residual** (a block with a skip: timm ``InvertedResidual``, and ``DepthwiseSeparableConv`` without a pointwise
activation, MobileNetV2's first stage).  The block computes ``x + N(z)`` with ``N`` its last norm (``bn3`` /
``bn2``, no activation after it).  With ``γ = β = 0``, ``N(z) = 0·ẑ + 0 = 0`` whatever ``ẑ`` is normalised by
(batch or running statistics), so the block is exactly the identity in both modes on every input (timm's
``zero_init_last``).  It still learns: ``∂L/∂γ_c = ⟨∂L/∂y_c, ẑ_c⟩ ≠ 0``.

**Identity** (no skip: MobileNetV1's ``dsa`` blocks, which timm builds without one, and stack layers), after
Net2DeeperNet (Chen, Goodfellow & Shlens 2016): every new conv / linear layer is the identity (a depthwise kernel
is 1 at its centre tap ``((k_h−1)/2, (k_w−1)/2)``, a pointwise conv or linear layer the identity matrix, biases 0)
and every new norm is the identity on one batch: from the block's input ``x`` on that batch in train mode, per
channel ``μ_b`` and the biased ``σ_b²``, the norm gets ``γ = √(σ_b² + ε)``, ``β = μ_b`` and running statistics
``μ_b, σ_b²``, so ``N(x) = γ (x − μ_b)/√(σ_b² + ε) + β = x``.  The block's input is the output ``x = φ(u)`` of
the activation ``φ`` that the new block applies after each of its norms, so the block computes ``φ(x)``
(MobileNetV1: ``φ(N(K⋆x))``, twice; a stack: ``φ(N(Wx))``), and ``φ(x) = φ(φ(u)) = φ(u) = x`` when ``φ`` is
idempotent: ReLU and ReLU6 (:data:`IDEMPOTENT`).  Exact in eval mode on every input (the norms are the identity
map whatever ``x``); in train mode on the calibration batch only — another batch is normalised by its own
statistics.  Not exact, and refused
by :func:`deepen`: after an activation that is not idempotent (SiLU, leaky ReLU: ``φ(φ(u)) ≠ φ(u)``), and after a
layer without an activation (a linear bottleneck, a classifier, a T-Net's transform), where ``φ`` would clip
negative inputs; there a new layer can only go in as a residual block.

A deepened stage keeps timm's feature levels (they tap whole stages); the model's depth record
(``model.nas_split_depth``) lets :func:`nas_split.save_grown` / :func:`nas_split.load_grown` rebuild it.

Depth and width candidates compete under one MAC budget: :func:`mixed_prefix_within_macs` cuts a ranked list of
both, counting blocks and channels together, cross terms included.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..cost import count_macs
from ..errors import NasSplitError
from ..numerics import like_model, model_device
from ..surgery import CouplingGraph
from ..surgery.blocks import TIMM_BLOCKS, Site, insert, new_modules, renamer, sites
from .channel_cost import longest_prefix, macs_after_growth
from .neurons import activation_kind

__all__ = ["IDEMPOTENT", "Site", "insertion_sites", "why_not_exact", "block_inputs", "close_block", "deepen",
           "in_insertion_order", "mixed_prefix_within_macs"]

#: activations with ``φ(φ(u)) = φ(u)``, after which an identity block keeps the function
IDEMPOTENT = ("relu", "relu6")


def _is_residual(modules: Sequence[nn.Module]) -> bool:
    """Whether new modules form a block with a skip (closed by zeroing its last norm)."""
    return isinstance(modules[0], TIMM_BLOCKS) and bool(modules[0].has_skip)


def why_not_exact(model: nn.Module, site: Site) -> str | None:
    """Why no new block at ``site`` keeps ``model``'s function (``None`` when one does)."""
    seq = dict(model.named_modules())[site.container]
    before = seq[site.after]
    if isinstance(before, TIMM_BLOCKS):
        if not getattr(before, "has_pw_act", False):  # a new block of this stage has a skip
            return None
        act = before.bn2.act
    else:
        act = before
    kind = activation_kind(act)
    if kind not in IDEMPOTENT:
        return (f"{site}: the new block would apply {type(act).__name__} again to that activation's output, which "
                f"it changes ({kind or 'an unknown activation'} is not idempotent)")
    return None


def insertion_sites(model: nn.Module) -> list[Site]:
    """Every site of ``model`` (:func:`nas_split.surgery.blocks.sites`) where :func:`deepen` keeps the function."""
    return [s for s in sites(model) if why_not_exact(model, s) is None]


def _cuda(device: torch.device) -> list[torch.device]:
    return [device] if device.type == "cuda" else []


def block_inputs(model: nn.Module, where: Iterable[Site], batch: torch.Tensor) -> dict[Site, torch.Tensor]:
    """The input of a new block at each site on ``batch`` in train mode (the output of the child it follows).

    ``model`` is run once in train mode without gradients; its running statistics, its modules' ``training``
    flags and the random state are given back afterwards."""
    where = list(where)
    modules = dict(model.named_modules())
    out: dict[Site, torch.Tensor] = {}
    hooks = [modules[s.child].register_forward_hook(lambda _m, _i, y, s=s: out.__setitem__(s, y.detach().clone()))
             for s in where]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    flags = [(m, m.training) for m in model.modules()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=_cuda(model_device(model))):
            model.train()(like_model(model, batch))
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, training in flags:
            m.training = training
    return out


def _identity_weight(layer: nn.Module) -> None:
    """Zero ``layer``'s weight but for ones at the centre tap of each output's own channel (bias zero)."""
    w = layer.weight
    if any(k % 2 == 0 for k in w.shape[2:]):
        raise NasSplitError(f"{type(layer).__name__} with an even kernel {tuple(w.shape[2:])} has no centre tap")
    c = torch.arange(w.shape[0], device=w.device)
    centre = tuple((k - 1) // 2 for k in w.shape[2:])
    w.zero_()
    w[(c, torch.zeros_like(c) if w.shape[1] == 1 else c, *centre)] = 1
    if layer.bias is not None:
        layer.bias.zero_()


def _identity_norm(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> None:
    """``γ = √(σ_b² + ε)``, ``β = μ_b`` and running ``μ_b, σ_b²`` from ``x``'s channels (dim 1)."""
    if not norm.affine:
        raise NasSplitError("a norm without affine parameters cannot be set to the identity")
    z = x.transpose(0, 1).reshape(x.shape[1], -1).to(norm.weight)
    mean, var = z.mean(1), z.var(1, unbiased=False)
    norm.weight.copy_((var + norm.eps).sqrt())
    norm.bias.copy_(mean)
    if norm.running_mean is not None:
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)


def close_block(modules: Sequence[nn.Module], x: torch.Tensor | None) -> None:
    """Set new modules to compute the identity (see the module docstring): a residual block's last norm to zero,
    otherwise identity layers and norms set on ``x``, the block's input on a batch in train mode."""
    first = modules[0]
    with torch.no_grad():
        if _is_residual(modules):
            last = first.bn3 if hasattr(first, "bn3") else first.bn2
            last.weight.zero_()
            last.bias.zero_()
            return
        timm_block = isinstance(first, TIMM_BLOCKS)
        for layer in (first.conv_dw, first.conv_pw) if timm_block else modules[:1]:
            _identity_weight(layer)
        for norm in (first.bn1, first.bn2) if timm_block else modules[1:2]:
            _identity_norm(norm, x)


def deepen(model: nn.Module, site: Site, batch: torch.Tensor | None = None,
           modules: list[nn.Module] | None = None) -> list[str]:
    """Insert a new block or layer at ``site`` keeping ``model``'s function (see the module docstring); returns the
    names of the new modules.

    Args:
        batch: inputs of ``model``; needed for a block without a skip, whose norms are set on it.
        modules: the modules to insert (e.g. a scored candidate's); default: fresh ones
            (:func:`nas_split.surgery.blocks.new_modules`).  They are set to the identity.

    Raises:
        NasSplitError: no block at ``site`` keeps the function (:func:`why_not_exact`), or no ``batch`` for one
            that needs it.
    """
    reason = why_not_exact(model, site)
    if reason:
        raise NasSplitError(f"a new block would not keep the function: {reason}")
    modules = modules or new_modules(model, site)
    if _is_residual(modules):
        close_block(modules, None)
    elif batch is None:
        raise NasSplitError(f"{site}: a new block without a skip is set to the identity on a batch: pass one")
    else:
        close_block(modules, block_inputs(model, [site], batch)[site])
    return insert(model, site, modules)


def in_insertion_order(where: Iterable[Site]) -> list[Site]:
    """Sites of one model in an order that keeps each valid while the others are inserted: last child first."""
    return sorted(where, key=lambda s: (s.container, -s.after))


def mixed_prefix_within_macs(model: nn.Module, example_inputs: torch.Tensor,
                             items: Sequence[tuple[str, int] | Site], max_macs: float) -> int:
    """The longest prefix of ``items`` — width items ``(layer, new channels)`` and depth sites (each once), best
    first — whose growth keeps the model's MACs at or under ``max_macs``.

    Exact, cross terms included: every block of ``items`` is inserted on one copy of ``model`` (structure only),
    whose coupling graph is traced once; a prefix counts the blocks it holds (not the others) and its channels on
    the renamed layers (:func:`~.channel_cost.macs_after_growth`: a new block in a widened residual stream, or
    after a widened layer, widens with it).  Apply a prefix the same way: blocks first
    (:func:`in_insertion_order`), then channels on ``renamer(model, its sites)(layer)``.
    """
    where = [i for i in items if isinstance(i, Site)]
    if len(set(where)) != len(where):
        raise ValueError("a site may take one block per round: items name one twice")
    deep = copy.deepcopy(model) if where else model
    new: dict[Site, list[nn.Module]] = {}
    with torch.random.fork_rng(devices=_cuda(model_device(model))):
        for s in in_insertion_order(where):
            new[s] = new_modules(deep, s)
            insert(deep, s, new[s])
    names = {m: n for n, m in deep.named_modules()}
    prefixes = {s: [names[m] for m in ms] for s, ms in new.items()}
    rename = renamer(model, where)
    layers = {rename(i[0]) for i in items if not isinstance(i, Site)}
    graph = CouplingGraph(deep, example_inputs) if layers else None
    groups = {layer: graph.group(layer) for layer in layers}
    total, per = count_macs(deep, example_inputs)

    def fits(k: int) -> bool:
        absent = [p for s, ps in prefixes.items() if s not in items[:k] for p in ps]
        own = {n: v for n, v in per.items() if not any(n == p or n.startswith(f"{p}.") for p in absent)}
        added: dict[str, int] = defaultdict(int)
        for i in items[:k]:
            if not isinstance(i, Site):
                added[rename(i[0])] += i[1]
        counted = (total - sum(per.values()) + sum(own.values()), own)
        return macs_after_growth(deep, example_inputs, groups, added, counted) <= max_macs

    return longest_prefix(len(items), fits)
