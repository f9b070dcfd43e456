"""Splitting matrices and their extreme eigenpairs, exact (S2D) and fast (Rayleigh-quotient SGD).

For neuron ``o`` of layer ℓ (see :mod:`.neurons`) with input patches ``p`` at positions ``l``:

    S_o = E_x[ Σ_l g_{o,l} σ''(u_{o,l}) a_o² p_l p_lᵀ ],        g = ∂L/∂σ (back-propagated),

(Liu, Wu & Wang 2019, eq. for deep networks; BN folded in eval mode).  The exact method accumulates ``S_o`` from
unfolded patches, ``S_o += Pᵀ diag(c_o) P`` with ``c = g σ''(u) a²``, chunked over neurons to bound memory,
then ``torch.linalg.eigh`` gives ``λ_min, v_min, λ_max, v_max``.  No D×D dummy parameter per neuron is needed.

Across processes (:mod:`nas_split.distributed`) each process passes its shard of every batch; the sums over
samples (the matrices, the fast method's ``S v`` of each step and its ``λ``) are added over the processes, so
every process holds what one process would compute on the union of the shards.

The fast method (Wang et al. 2019) never forms ``S``: ``S_o v_o = Σ_l c_{o,l} (p_l·v_o) p_l`` is the weight
gradient of a convolution whose output gradient is ``c ⊙ conv(x, v)``, so every neuron of every layer gets
``S v`` from one ordinary backward pass plus two convolutions per layer.  Each ``v`` descends (``v_min``) or
ascends (``v_max``) its Rayleigh quotient ``R(v) = vᵀSv / vᵀv`` with RMSprop and is renormalised; a final pass
with the directions fixed averages ``R`` into ``λ``.

**Through a depthwise conv** (a :class:`~.neurons.Tail`: the neuron's activation feeds only a depthwise conv
with kernel ``K``, norm ``(s, t)`` and activation τ, as in MobileNet blocks): each copy carries its own depthwise
channel, so the function the consumer sees linearly is ``y_q(w) = τ(e_q)``, ``e_q = s Σ_k K_k σ(u_{q+k}) + t``, and

    ∇²_w y_q = τ'(e_q) s Σ_k K_k σ''(u_{q+k}) a² p p ᵀ  +  τ''(e_q) ∇e_q ∇e_qᵀ,
    ∇e_q = s a Σ_k K_k σ'(u_{q+k}) p_{q+k}.

Summed against ``∂L/∂y_q`` the first part is the matrix above (``g = ∂L/∂σ`` already carries ``τ' s K``); the
second adds

    T_o = E_x[ Σ_q h_{o,q} V_{o,q} V_{o,q}ᵀ ],   h = ∂L/∂y τ''(e) s²,   V_{o,q} = Σ_k K_{o,k} σ'(u_{o,q+k}) a_o p_{q+k},

i.e. ``V_o`` is the depthwise conv of the patches weighted by ``σ'(u) a``.  Exact: ``T_o`` per chunk of neurons
from one depthwise convolution over ``N · D`` maps; fast: ``T_o v = ∇_v ½ Σ_q h_q (V_qᵀ v)²``, with
``V_qᵀ v = (K ⋆ (σ' a ⊙ q))``, ``q = conv(x, v)`` and ``∂/∂q = σ' a ⊙ (K ⋆ᵀ (h ⊙ V_qᵀ v))`` (the depthwise conv's
input gradient, ``conv2d_input``).  Measured on CPU (``mobilenetv1_cifar_025`` ×0.125, 8 px, 5 batches of 64):
the term made exact analysis 4.1× and fast 1.7× as slow as without it (fast with an autograd call for ``∂/∂q``,
since replaced by ``conv2d_input``, bit for bit the same).  Without ``T`` the prediction
is off by factors of 0.8 to 2.7 on a SiLU MobileNet block (``tests/test_prediction.py``).

Linear neurons (no nonlinearity, e.g. MobileNetV2's projection convs) have ``σ'' = 0`` and hence ``S = 0``: a
split of such a neuron leaves the network function unchanged for every ε, so it can never lower the loss.
They are reported with ``λ_min = λ_max = 0`` and never selected.  (The published MobileNetV2 code uses σ'' ≡ 1
there, a pseudo-matrix without meaning in the theory; nas-split does not reproduce it.)
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..cost.counting import input_gradients_only
from ..distributed import all_reduce_sum, batch_share, world_size
from ..errors import DivergedError
from ..growth.neurons import Neuron, NotAnalyzableError
from ..numerics import evaluating, full_precision, like_model, model_device
from .activations import first_derivative, second_derivative

__all__ = ["Spectrum", "splitting_matrices", "exact_spectrum", "fast_spectrum", "LossFn"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Spectrum:
    """Extreme eigenpairs of the splitting matrices of one layer's neurons (``O`` neurons, fan-in ``D``)."""

    lam_min: torch.Tensor  # (O,)
    v_min: torch.Tensor    # (O, *fan_in)
    lam_max: torch.Tensor  # (O,)
    v_max: torch.Tensor    # (O, *fan_in)


def _check(nr: Neuron) -> None:
    m = nr.layer
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str) or isinstance(m, nn.Conv3d):
            raise NotAnalyzableError(f"layer {nr.name!r}: only dense Conv1d/Conv2d with numeric zero padding")
    elif not isinstance(m, nn.Linear):
        raise NotAnalyzableError(f"layer {nr.name!r} is not a conv or linear layer")


def _as_2d(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Input as 4-D and the conv2d arguments of ``m`` (Conv1d becomes a 1 x k Conv2d)."""
    if isinstance(m, nn.Conv1d):
        return x.unsqueeze(2), {"stride": (1, m.stride[0]), "padding": (0, m.padding[0]),
                                "dilation": (1, m.dilation[0])}
    return x, {"stride": m.stride, "padding": m.padding, "dilation": m.dilation}


def _kernel_2d(m: nn.Module) -> tuple[int, int]:
    return (1, m.kernel_size[0]) if isinstance(m, nn.Conv1d) else tuple(m.kernel_size)


def _patches(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input patches ``(N * L, D)`` in the order of the output positions."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    x4, kw = _as_2d(m, x)
    p = F.unfold(x4, _kernel_2d(m), **kw)  # (N, D, L)
    return p.transpose(1, 2).reshape(-1, p.shape[1])


def _preact(layer: nn.Module, fold: tuple[torch.Tensor, torch.Tensor], z: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``u = a (z − bias) + b`` from a layer's output ``z``, and ``a`` broadcastable to it."""
    a, b = fold
    shape = (1,) * (z.dim() - 1) + (-1,) if isinstance(layer, nn.Linear) else (1, -1) + (1,) * (z.dim() - 2)
    z_lin = z - (layer.bias.detach().view(shape) if layer.bias is not None else 0)
    return a.view(shape) * z_lin + b.view(shape), a.view(shape)


def _coefficients(nr: Neuron, z: torch.Tensor, g: torch.Tensor, beta: float) -> torch.Tensor:
    """``c = g σ''(u) a²`` with the shape of the layer's output ``z`` (channels on dim 1, or last for linear)."""
    u, a = _preact(nr.layer, nr.fold(), z)
    return g * second_derivative(nr.kind, u, beta) * a * a


@dataclass
class _TailTerm:
    """What the depthwise-tail term needs, 4-D (Conv1d as 1 x L): ``w1 = σ'(u) a`` at the split layer's output,
    ``h = ∂L/∂y τ''(e) s²`` at the depthwise output, the depthwise kernel and its conv2d arguments."""

    w1: torch.Tensor      # (N, O, H, W)
    h: torch.Tensor       # (N, O, H', W')
    kernel: torch.Tensor  # (O, 1, kh, kw)
    kw: dict


def _tail_term(nr: Neuron, d: dict[str, torch.Tensor], beta: float) -> _TailTerm:
    tail = nr.tail
    u, a = _preact(nr.layer, nr.fold(), d["z"])
    e, s = _preact(tail.conv, tail.fold(), d["z_dw"])
    w1 = first_derivative(nr.kind, u) * a
    h = d["g_dw"] * second_derivative(tail.kind, e, beta) * s * s
    kernel = tail.conv.weight.detach()
    if isinstance(tail.conv, nn.Conv1d):
        w1, h, kernel = w1.unsqueeze(2), h.unsqueeze(2), kernel.unsqueeze(2)
    _, kw = _as_2d(tail.conv, d["z"])
    return _TailTerm(w1, h, kernel, {**kw, "groups": kernel.shape[0]})


def _tail_matrices(t: _TailTerm, p: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    """``Σ_n Σ_q h V Vᵀ`` per neuron, ``(O, D, D)`` float64, from the patches ``p`` ``(N * L, D)``: the patches
    weighted by ``σ'(u) a`` go through the depthwise conv as a batch of ``N · D`` maps."""
    n, o, hh, ww = t.w1.shape
    dd = p.shape[1]
    p4 = p.view(n, hh, ww, dd).permute(0, 3, 1, 2)                              # (N, D, H, W)
    out = torch.zeros(o, dd, dd, dtype=torch.float64, device=p.device)
    step = max(1, int(chunk_bytes // max(1, 2 * n * dd * hh * ww * p.element_size())))
    for i in range(0, o, step):
        c = min(step, o - i)
        x = (p4[:, :, None] * t.w1[:, None, i:i + c]).reshape(n * dd, c, hh, ww)
        v = F.conv2d(x, t.kernel[i:i + c], None, **{**t.kw, "groups": c})        # (N·D, c, H', W')
        v = v.view(n, dd, c, -1).permute(2, 1, 0, 3).reshape(c, dd, -1)        # (c, D, N·Q)
        h = t.h[:, i:i + c].transpose(0, 1).reshape(c, 1, -1)
        out[i:i + c] = ((v * h) @ v.transpose(1, 2)).double()
    return out


def _flat(nr: Neuron, c: torch.Tensor) -> torch.Tensor:
    """Coefficients as ``(N * L, O)`` in the order of :func:`_patches`."""
    if isinstance(nr.layer, nn.Linear):
        return c.reshape(-1, c.shape[-1])
    return c.movedim(1, -1).reshape(-1, c.shape[1])


class _Capture:
    """Hooks that record, per analysed layer, its input ``x``, output ``z`` and ``g = ∂L/∂σ``; with a depthwise
    tail also the depthwise output ``z_dw`` and ``g_dw = ∂L/∂y`` at the tail's activation."""

    def __init__(self, neurons: dict[str, Neuron]):
        self.neurons = neurons
        self.data: dict[str, dict[str, torch.Tensor]] = {}
        self.handles = []
        acts = [id(nr.act) for nr in neurons.values()]
        if len(acts) != len(set(acts)):
            raise NotAnalyzableError("an activation module is shared by several layers; give each its own")
        for name, nr in neurons.items():
            self.handles.append(nr.layer.register_forward_hook(self._layer_hook(name)))
            self.handles.append(nr.act.register_forward_hook(self._act_hook(name, "g")))
            if nr.tail is not None:
                self.handles.append(nr.tail.conv.register_forward_hook(self._dw_hook(name)))
                self.handles.append(nr.tail.act.register_forward_hook(self._act_hook(name, "g_dw")))

    def _layer_hook(self, name):
        def fn(_m, inputs, out):
            self.data[name] = {"x": inputs[0].detach(), "z": out.detach()}
        return fn

    def _dw_hook(self, name):
        def fn(_m, _inputs, out):
            self.data[name]["z_dw"] = out.detach()
        return fn

    def _act_hook(self, name, key):
        def fn(_m, _inputs, out):
            if out.requires_grad:
                out.register_hook(lambda grad: self.data[name].__setitem__(key, grad.detach()))
        return fn

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _passes(model: nn.Module, loader: Iterable, neurons: dict[str, Neuron], loss_fn: LossFn,
            max_batches: int | None) -> Iterator[tuple[int, dict[str, dict[str, torch.Tensor]]]]:
    """For each batch: forward + backward (eval mode), yield the batch size and the captured tensors.

    The backward asks for the gradient of a floating-point input only: the hooks take the activations' gradients
    on the way, and autograd skips the weights' gradients (about a third of a training step's work; counted as
    such, :func:`~nas_split.cost.input_gradients_only`).  The model runs on a copy of the input, so a model that
    edits its input in place still works.  Where a batch shows an activation the input does not reach, that batch
    and every later one ask for the parameters' gradients instead (one more forward and backward for that batch);
    so does an integer input."""
    device = model_device(model)
    cap = _Capture(neurons)
    params = [p for p in model.parameters() if p.requires_grad]
    by_input = True  # until a batch shows an activation the input does not reach

    def missing() -> list[str]:
        return [n for n, nr in neurons.items()
                if not {"g"} | ({"g_dw"} if nr.tail is not None else set()) <= cap.data.get(n, {}).keys()]

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cap.data = {}
        loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            raise DivergedError(f"loss is {loss.item()} during splitting analysis")
        return loss

    try:
        with evaluating(model):
            for x, y in itertools.islice(loader, max_batches):
                x, y = like_model(model, x), y.to(device)
                use_input = by_input and x.is_floating_point()
                if use_input:
                    leaf = x.detach().requires_grad_(True)
                    with input_gradients_only():
                        loss = loss_of(leaf.clone(), y)
                    torch.autograd.grad(loss, leaf, allow_unused=True)
                    del loss
                    by_input = not missing()
                if not use_input or not by_input:
                    torch.autograd.grad(loss_of(x, y), params, allow_unused=True)
                if gone := missing():
                    raise NotAnalyzableError(f"no gradient reached the activation of {gone[0]!r}")
                yield len(y), cap.data
    finally:
        cap.close()


@full_precision()
def splitting_matrices(model: nn.Module, loader: Iterable, neurons: dict[str, Neuron], loss_fn: LossFn,
                       beta: float = 3.0, max_batches: int | None = None,
                       chunk_bytes: int = 2 * 1024 ** 3) -> dict[str, torch.Tensor]:
    """Exact splitting matrices ``{layer: S (O, D, D)}`` averaged over ``loader`` (``D`` = fan-in size).

    Memory of one chunk of neurons ``(chunk, N·L, D)`` is kept under ``chunk_bytes`` (default 2 GB).
    """
    for nr in neurons.values():
        _check(nr)
    acc: dict[str, torch.Tensor] = {}
    total = 0
    for n_b, data in _passes(model, loader, neurons, loss_fn, max_batches):
        total += n_b
        for name, nr in neurons.items():
            d = data[name]
            p = _patches(nr.layer, d["x"])                                 # (M, D)
            c = _flat(nr, _coefficients(nr, d["z"], d["g"], beta))         # (M, O)
            m_, dd = p.shape
            o = c.shape[1]
            s = acc.setdefault(name, torch.zeros(o, dd, dd, dtype=torch.float64, device=p.device))
            step = max(1, int(chunk_bytes // max(1, m_ * dd * p.element_size())))
            for i in range(0, o, step):
                cp = c[:, i:i + step].T.unsqueeze(2) * p.unsqueeze(0)     # (chunk, M, D)
                s[i:i + step] += (cp.transpose(1, 2) @ p).double() * n_b   # batch mean -> weight by batch size
            if nr.tail is not None:
                s += _tail_matrices(_tail_term(nr, d, beta), p, chunk_bytes) * n_b
    n = all_reduce_sum(torch.tensor(float(total), dtype=torch.float64, device=model_device(model)))
    return {k: all_reduce_sum(v) / n.clamp_min(1) for k, v in acc.items()}


def exact_spectrum(model: nn.Module, loader: Iterable, neurons: dict[str, Neuron], loss_fn: LossFn,
                   beta: float = 3.0, max_batches: int | None = None,
                   chunk_bytes: int = 2 * 1024 ** 3) -> dict[str, Spectrum]:
    """S2D analysis: exact ``S`` per neuron, then ``eigh`` (float64) for both ends of the spectrum."""
    out = {}
    for name, s in splitting_matrices(model, loader, neurons, loss_fn, beta, max_batches, chunk_bytes).items():
        lam, vec = torch.linalg.eigh(0.5 * (s + s.transpose(1, 2)))
        shape = (-1, *neurons[name].layer.weight.shape[1:])
        dtype = neurons[name].layer.weight.dtype
        out[name] = Spectrum(lam[:, 0].to(dtype), vec[:, :, 0].reshape(shape).to(dtype),
                             lam[:, -1].to(dtype), vec[:, :, -1].reshape(shape).to(dtype))
    return out


def _sv(nr: Neuron, d: dict[str, torch.Tensor], beta: float, v: torch.Tensor) -> torch.Tensor:
    """``S_batch v`` for all neurons of a layer, ``(O, *fan_in)``, from the captured tensors ``d`` (the batch's
    coefficients are kept in ``d`` for the next direction).  With a depthwise tail both parts meet at the
    output-position gradient: ``S v = conv_weight(x, c ⊙ q + ∂/∂q ½ Σ h (V_qᵀ v)²)``, ``q = conv(x, v)``."""
    if "c" not in d:
        d["c"] = _coefficients(nr, d["z"], d["g"], beta)
    if nr.tail is None:
        return _sv_main(nr, d["x"], d["c"], v)
    if "tail" not in d:
        d["tail"] = _tail_term(nr, d, beta)
    t, m = d["tail"], nr.layer
    x4, kw = _as_2d(m, d["x"])
    v4 = v.unsqueeze(2) if isinstance(m, nn.Conv1d) else v
    q = F.conv2d(x4, v4, None, **kw)                                                   # p·v per position
    vq = F.conv2d(q * t.w1, t.kernel, None, **t.kw)                                    # V_qᵀ v
    gq = torch.nn.grad.conv2d_input(q.shape, t.kernel, t.h * vq, **t.kw) * t.w1        # ∂/∂q ½ Σ h (V_qᵀ v)²
    c4 = d["c"].unsqueeze(2) if isinstance(m, nn.Conv1d) else d["c"]
    sv = torch.nn.grad.conv2d_weight(x4, v4.shape, c4 * q + gq, **kw)
    return sv.squeeze(2) if isinstance(m, nn.Conv1d) else sv


def _sv_main(nr: Neuron, x: torch.Tensor, c_full: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The first part of ``S_batch v`` (:func:`_coefficients` ``c_full``, no tail term)."""
    m = nr.layer
    if isinstance(m, nn.Linear):
        q = x @ v.T                                                  # (..., O)
        return (c_full * q).reshape(-1, q.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    x4, kw = _as_2d(m, x)
    v4 = v.unsqueeze(2) if isinstance(m, nn.Conv1d) else v
    q = F.conv2d(x4, v4, None, **kw)
    c4 = c_full.unsqueeze(2) if isinstance(m, nn.Conv1d) else c_full
    sv = torch.nn.grad.conv2d_weight(x4, v4.shape, c4 * q, **kw)
    return sv.squeeze(2) if isinstance(m, nn.Conv1d) else sv


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (v.dim() - 1))


@full_precision()
def fast_spectrum(model: nn.Module, loader: Iterable, neurons: dict[str, Neuron], loss_fn: LossFn,
                  beta: float = 3.0, passes: int = 3, max_batches: int | None = 20, lr: float = 0.05,
                  ends: tuple[str, ...] = ("min", "max"), init: dict[str, Spectrum] | None = None,
                  generator: torch.Generator | None = None) -> dict[str, Spectrum]:
    """Fast analysis (Rayleigh-quotient SGD): ``passes`` passes of ``max_batches`` batches update the directions
    (RMSprop, momentum 0.9, α 0.9), then one more pass with the directions fixed estimates ``λ``.

    Args:
        ends: ``"min"`` (S2D needs ``v_min``), ``"max"`` (S3D's signed splits need ``v_max``), or both.
        init: directions to start from (e.g. the previous round's), else uniform random.
    """
    for nr in neurons.values():
        _check(nr)
    vs: dict[tuple[str, str], torch.Tensor] = {}
    for name, nr in neurons.items():
        w = nr.layer.weight
        for end in ends:
            start = getattr(init[name], f"v_{end}") if init and name in init and \
                getattr(init[name], f"v_{end}").shape == w.shape else None
            v = start.clone() if start is not None else torch.rand(w.shape, generator=generator) - 0.5
            vs[(name, end)] = _unit(v.to(w.device, w.dtype)).requires_grad_(True)
    opt = torch.optim.RMSprop(list(vs.values()), lr=lr, momentum=0.9, alpha=0.9)
    for _ in range(passes):
        for n_b, data in _passes(model, loader, neurons, loss_fn, max_batches):
            opt.zero_grad(set_to_none=False)
            share = batch_share(n_b, model_device(model)) if world_size() > 1 else None
            for (name, end), v in vs.items():
                nr, d = neurons[name], data[name]
                with torch.no_grad():
                    sv = _sv(nr, d, beta, v)
                    if share is not None:  # the batch mean over every process's shard
                        sv = all_reduce_sum(sv * share)
                    vv = v.flatten(1).pow(2).sum(1)
                    r = (sv * v).flatten(1).sum(1) / vv
                    grad = 2 * (sv - r.view(-1, *[1] * (v.dim() - 1)) * v) / vv.view(-1, *[1] * (v.dim() - 1))
                    v.grad = grad if end == "min" else -grad
            opt.step()
            with torch.no_grad():
                for v in vs.values():
                    v.copy_(_unit(v))
    lam = {k: torch.zeros(v.shape[0], dtype=torch.float64, device=v.device) for k, v in vs.items()}
    total = 0
    for n_b, data in _passes(model, loader, neurons, loss_fn, max_batches):
        total += n_b
        with torch.no_grad():
            for (name, end), v in vs.items():
                nr, d = neurons[name], data[name]
                sv = _sv(nr, d, beta, v)
                lam[(name, end)] += (sv * v).flatten(1).sum(1).double() * n_b
    total = all_reduce_sum(torch.tensor(float(total), dtype=torch.float64, device=model_device(model))).item()
    for t in lam.values():
        all_reduce_sum(t)
    out = {}
    for name, nr in neurons.items():
        w = nr.layer.weight

        def get(end, name=name, w=w):
            if (name, end) not in vs:
                return torch.full((w.shape[0],), float("nan"), dtype=w.dtype), torch.zeros_like(w).detach()
            return (lam[(name, end)] / max(total, 1)).to(w.dtype), vs[(name, end)].detach().clone()

        (lmin, vmin), (lmax, vmax) = get("min"), get("max")
        out[name] = Spectrum(lmin, vmin, lmax, vmax)
    return out
