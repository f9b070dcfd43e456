"""New blocks and layers in depth: what they are and where they go (structure only), and the record that rebuilds
a deepened architecture from its seed.

A *site* is a child of an ``nn.Sequential`` after which new modules go (:class:`Site`).  Two kinds of
containers take them:

* a timm MobileNet stage ``blocks.i`` (children ``InvertedResidual`` / ``DepthwiseSeparableConv``): one new
  stride-1 block at the width of the block it follows, built as timm's builder builds that stage's repeats — the
  same class, kernel, expansion ratio, norm and activation layers, timm's initialisation — so it has its skip
  exactly when timm's block would (``in == out``, stride 1, and not a ``dsa`` block, which timm builds without
  one) (:func:`stage_block`);
* a stack of ``layer, norm, activation`` triples (PointNet's shared MLP and head): one new triple at the width of
  the triple it follows, its layer a square copy of that one's type, default-initialised (:func:`stack_layer`).

Inserting re-indexes the container's later children (``blocks.2.1`` becomes ``blocks.2.2``), as a model built
at the new depth names them (:func:`renamer` maps the old names).  timm's feature levels tap whole stages
(``feature_info`` names ``blocks.i``), so they neither move nor change width.

The model keeps a plain-data record of its depth, ``model.nas_split_depth``: ``{"stage_depths": [...]}`` (blocks
per stage) once a timm stage grew, ``{"inserted_layers": [[container, after], ...]}`` (in insertion order) once a
stack did.  :func:`~.export.save_grown` writes it into the spec, and :func:`replay_depth` rebuilds the structure
from it: a stage's stride-1 repeats are alike, so appending blocks to reach the counts gives the same modules
under the same names as inserting them where they were.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models._efficientnet_builder import efficientnet_init_weights
from torch import nn

from ..errors import NasSplitError

__all__ = ["Site", "DEPTH_KEYS", "TIMM_BLOCKS", "sites", "new_modules", "stage_block", "stack_layer", "insert",
           "renamer", "replay_depth"]

#: the spec keys of a depth record (``model.nas_split_depth``)
DEPTH_KEYS = ("stage_depths", "inserted_layers")
#: the timm blocks a stage may hold to grow in depth
TIMM_BLOCKS = (InvertedResidual, DepthwiseSeparableConv)
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_NORMS = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True, order=True)
class Site:
    """Where new modules go: after child ``after`` of the ``nn.Sequential`` named ``container``."""

    container: str
    after: int

    @property
    def child(self) -> str:
        """The name of the child the new modules follow."""
        return f"{self.container}.{self.after}" if self.container else str(self.after)

    def new(self, i: int) -> str:
        """The name of the ``i``-th module inserted here."""
        return f"{self.container}.{self.after + 1 + i}" if self.container else str(self.after + 1 + i)


def _is_stage(seq: nn.Module) -> bool:
    return isinstance(seq, nn.Sequential) and len(seq) > 0 and all(isinstance(b, TIMM_BLOCKS) for b in seq)


def _is_triple_end(seq: nn.Sequential, i: int) -> bool:
    """Whether children ``i-2, i-1, i`` of ``seq`` are a conv / linear layer, its batch norm and an activation."""
    return i >= 2 and isinstance(seq[i - 2], _LAYERS) and isinstance(seq[i - 1], _NORMS) and \
        not isinstance(seq[i], (*_LAYERS, _NORMS, nn.Sequential)) and len(list(seq[i].parameters())) == 0


def sites(model: nn.Module) -> list[Site]:
    """Every site of ``model``: after each block of a timm stage, after each ``layer, norm, activation`` triple
    of a stack (whatever the activation; :mod:`nas_split.growth.depth` says where an insertion keeps the
    function)."""
    out = []
    for name, seq in model.named_modules():
        if _is_stage(seq):
            out += [Site(name, j) for j in range(len(seq))]
        elif isinstance(seq, nn.Sequential):
            out += [Site(name, j) for j in range(len(seq)) if _is_triple_end(seq, j)]
    return out


def _container(model: nn.Module, site: Site) -> nn.Sequential:
    seq = dict(model.named_modules()).get(site.container)
    if not isinstance(seq, nn.Sequential) or not 0 <= site.after < len(seq):
        raise NasSplitError(f"{site}: no child {site.after} of an nn.Sequential named {site.container!r}")
    return seq


def stage_block(stage: nn.Sequential, after: int) -> nn.Module:
    """A stride-1 block of ``stage``'s kind at the output width of ``stage[after]``, initialised as timm does."""
    t = stage[after]
    plain = t.conv_s2d is None and isinstance(t.se, nn.Identity) and isinstance(t.aa, nn.Identity) and \
        t.conv_dw.groups == t.conv_dw.in_channels and type(t.conv_dw) is nn.Conv2d
    if not plain:
        raise NasSplitError(f"{type(t).__name__} with space-to-depth, squeeze-excitation, anti-aliasing, grouped or "
                            "'same'-padded convolutions: only MobileNet V1/V2 blocks grow in depth")
    opts = {"dw_kernel_size": t.conv_dw.kernel_size[0], "dilation": t.conv_dw.dilation[0], "stride": 1,
            "norm_layer": type(t.bn1), "act_layer": type(t.bn1.act)}
    if isinstance(t, InvertedResidual):
        width = t.conv_pwl.out_channels
        if any(not b.has_skip for b in list(stage)[1:]):  # a stage's repeats have a skip unless built noskip
            raise NasSplitError("an InvertedResidual built without its skip (noskip): a new one cannot keep the "
                                "function")
        block = InvertedResidual(width, width, exp_ratio=t.conv_pw.out_channels / t.conv_pw.in_channels, **opts)
    else:  # timm's 'ds' keeps the skip, 'dsa' (activation after the pointwise conv) never has one
        width = t.conv_pw.out_channels
        block = DepthwiseSeparableConv(width, width, noskip=t.has_pw_act, pw_act=t.has_pw_act, **opts)
    for new, old in zip((m for m in block.modules() if isinstance(m, _NORMS)),
                        (m for m in t.modules() if isinstance(m, _NORMS)), strict=True):
        new.eps, new.momentum = old.eps, old.momentum
    block.drop_path = copy.deepcopy(t.drop_path)
    efficientnet_init_weights(block)
    return block.to(t.conv_pw.weight)


def stack_layer(stack: nn.Sequential, after: int) -> list[nn.Module]:
    """A new ``layer, norm, activation`` triple after the triple that ends at ``stack[after]``, at its width: a
    square linear layer or 1x1 conv of the same type (bias if it has one), a norm with its settings, a copy of its
    activation; PyTorch's default initialisation."""
    if not _is_triple_end(stack, after):
        raise NasSplitError(f"child {after} does not end a layer, norm, activation triple")
    layer, norm, act = stack[after - 2], stack[after - 1], stack[after]
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        new = nn.Linear(layer.out_features, layer.out_features, bias=bias)
    elif set(layer.kernel_size) == {1} and layer.groups == 1:
        new = type(layer)(layer.out_channels, layer.out_channels, 1, bias=bias)
    else:
        raise NasSplitError(f"{type(layer).__name__} with kernel {layer.kernel_size} or groups: only linear layers "
                            "and dense 1x1 convs grow in depth")
    new_norm = type(norm)(norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                          track_running_stats=norm.track_running_stats)
    return [m.to(layer.weight) for m in (new, new_norm, copy.deepcopy(act))]


def new_modules(model: nn.Module, site: Site) -> list[nn.Module]:
    """The modules a site takes (:func:`stage_block` or :func:`stack_layer`), freshly initialised."""
    seq = _container(model, site)
    if _is_stage(seq):
        return [stage_block(seq, site.after)]
    if _is_triple_end(seq, site.after):
        return stack_layer(seq, site.after)
    raise NasSplitError(f"{site}: neither a timm stage nor the end of a layer, norm, activation triple")


def _count(seq: nn.Sequential) -> int:
    return 1 if _is_stage(seq) else 3


def insert(model: nn.Module, site: Site, modules: list[nn.Module]) -> list[str]:
    """Put ``modules`` after ``site`` (later children re-indexed; the new ones in the container's train / eval
    mode) and update ``model.nas_split_depth``; returns the names of the new modules."""
    seq = _container(model, site)
    for m in modules:
        m.train(seq.training)
    children = list(seq)
    children[site.after + 1:site.after + 1] = modules
    seq._modules.clear()
    for i, m in enumerate(children):
        seq.add_module(str(i), m)
    record = dict(getattr(model, "nas_split_depth", None) or {})
    stages = getattr(model, "blocks", None)
    if _is_stage(seq) and any(seq is s for s in stages or ()):
        record["stage_depths"] = [len(s) for s in stages]
    else:
        record["inserted_layers"] = [*record.get("inserted_layers", []), [site.container, site.after]]
    model.nas_split_depth = record
    return [site.new(i) for i in range(len(modules))]


def renamer(model: nn.Module, inserted: Iterable[Site]) -> Callable[[str], str]:
    """The new name of each module of ``model`` once new modules go in at every site of ``inserted`` (sites of
    ``model`` as it is now, each once): a later child ``i`` of a container moves by the modules inserted before
    it."""
    shifts: dict[str, list[tuple[int, int]]] = {}
    for s in inserted:
        shifts.setdefault(s.container, []).append((s.after, _count(_container(model, s))))

    def rename(name: str) -> str:
        for container, entries in shifts.items():
            prefix = f"{container}." if container else ""
            head, _, rest = name[len(prefix):].partition(".")
            if name.startswith(prefix) and head.isdigit():
                i = int(head) + sum(n for after, n in entries if after < int(head))
                return f"{prefix}{i}" + (f".{rest}" if rest else "")
        return name

    return rename


def replay_depth(model: nn.Module, spec: Mapping[str, Any]) -> None:
    """Give ``model`` (freshly built from the seed) the depth a spec records (:data:`DEPTH_KEYS`): blocks appended
    to each timm stage up to ``stage_depths``, then the ``inserted_layers`` in their order; new modules are
    initialised as :func:`new_modules` does (weights are loaded afterwards, or kept as a constructor's)."""
    depths = spec.get("stage_depths")
    if depths is not None:
        stages = list(getattr(model, "blocks", None) or [])
        if len(depths) != len(stages) or not all(isinstance(d, int) and d >= len(s) for d, s in
                                                 zip(depths, stages, strict=False)):
            raise NasSplitError(f"stage_depths {depths} do not deepen the {len(stages)} stages "
                                f"{[len(s) for s in stages]} of this {type(model).__name__}")
        for i, (stage, d) in enumerate(zip(stages, depths, strict=True)):
            while len(stage) < d:
                insert(model, Site(f"blocks.{i}", len(stage) - 1), [stage_block(stage, len(stage) - 1)])
    for entry in spec.get("inserted_layers", []):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], int)):
            raise NasSplitError(f"inserted_layers entries are [container, after], got {entry!r}")
        site = Site(entry[0], entry[1])
        insert(model, site, new_modules(model, site))
