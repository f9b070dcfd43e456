"""The synchronised batch norm of ``train.sync_batchnorm`` (nas_split.sync_batchnorm), checked on its own.

Two gloo processes each hold a shard (rows ``r::2``, 4 and 3 of 7 samples: unequal shards) and run the converted
modules in float64; one process runs plain batch norm on the whole batch.  Outputs, input gradients, the
parameter gradients summed over the processes (as DDP adds them for a summed loss) and the running statistics
after two steps (the second shifted by a non-zero running mean) must agree to 1e-12.  The growth that uses it is
checked in tests/test_distributed.py.
"""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.layers import BatchNormAct2d
from torch import nn

from nas_split.errors import ConfigError
from nas_split.sync_batchnorm import SYNCED_TYPES, AllReduceBatchNorm, AllReduceBatchNormAct, synchronized_batchnorm

SAMPLES, STEPS = 7, 2


def _case(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A model holding one batch norm (float64, non-trivial affine and running statistics), a batch far from
    zero mean, and the weights of a summed loss ``Σ out · g``."""
    g = torch.Generator().manual_seed(len(name))
    bn, shape = {"bn2d": (lambda: nn.BatchNorm2d(3), (SAMPLES, 3, 4, 5)),
                 "bn1d-momentum-none": (lambda: nn.BatchNorm1d(3, momentum=None), (SAMPLES, 3)),
                 "bn1d-3d-input": (lambda: nn.BatchNorm1d(3, momentum=0.3), (SAMPLES, 3, 6)),
                 "bnact2d": (lambda: BatchNormAct2d(3, act_layer=nn.SiLU), (SAMPLES, 3, 4, 4))}[name]
    model = nn.Sequential(bn()).double()
    with torch.no_grad():
        norm = model[0]
        norm.weight.copy_(1 + 0.3 * torch.randn(3, generator=g))
        norm.bias.copy_(0.2 * torch.randn(3, generator=g))
        norm.running_mean.copy_(torch.randn(3, generator=g))
        norm.running_var.copy_(1 + torch.rand(3, generator=g))
    x = (5 + 2 * torch.randn(shape, generator=g)).double()
    return model, x, torch.randn(shape, generator=g).double()


CASES = ["bn2d", "bn1d-momentum-none", "bn1d-3d-input", "bnact2d"]


def _run(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """``STEPS`` train-mode forward/backward passes, then one in eval mode; everything they produce."""
    out: dict[str, torch.Tensor] = {}
    model.train()
    for step in range(STEPS):
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        params = list(model.parameters())
        grads = torch.autograd.grad((y * g).sum(), [xi, *params])
        out[f"out{step}"], out[f"grad_x{step}"] = y.detach(), grads[0]
        for (n, _), gp in zip(model.named_parameters(), grads[1:], strict=True):
            out[f"grad_{n}{step}"] = gp
    norm = model[0]
    out.update(running_mean=norm.running_mean.clone(), running_var=norm.running_var.clone(),
               num_batches_tracked=norm.num_batches_tracked.clone().double())
    with torch.no_grad():
        out["eval"] = model.eval()(x)
    return out


def _worker(r: int, port: int, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=2)
    try:
        found: dict = {}
        for name in CASES:
            model, x, g = _case(name)
            original = model[0]
            with synchronized_batchnorm(model):
                found[f"{name} type"] = type(model[0]).__name__
                found[f"{name} shares"] = model[0].weight is original.weight and \
                    model[0].running_mean is original.running_mean
                res = _run(model, x[r::2], g[r::2])
            found[f"{name} restored"] = model[0] is original
            for k, v in res.items():
                if k.startswith("grad_0."):  # parameter gradients: added over the processes, as by DDP
                    dist.all_reduce(v)
                found[(name, k)] = v
        found["act kept"] = model[0].act is original.act  # the last case: BatchNormAct2d

        class OwnForward(nn.BatchNorm2d):
            def forward(self, x):
                return super().forward(x) * 2

        try:
            with synchronized_batchnorm(nn.Sequential(OwnForward(3))):
                pass
        except ConfigError as e:
            found["refused"] = str(e)
        torch.save(found, f"{results}/rank{r}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_normalise_as_one_batch_norm_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    worst = 0.0
    for name in CASES:
        ref = _run(*_case(name))
        for r, found in enumerate(ranks):
            assert found[f"{name} type"] == ("AllReduceBatchNormAct" if name == "bnact2d" else "AllReduceBatchNorm")
            assert found[f"{name} shares"] and found[f"{name} restored"], name
            for k, want in ref.items():
                whole_batch = k.startswith(("out", "grad_x", "eval"))
                got, want = found[(name, k)], want[r::2] if whole_batch else want
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{name} {k} rank {r}")
                worst = max(worst, (got - want).abs().max().item())
    assert ranks[0]["act kept"] and ranks[1]["act kept"]
    assert "OwnForward" in ranks[0]["refused"]
    print(f"largest difference to one process: {worst:.2e}")
    # without the synchronisation each shard normalises with its own statistics: far from the whole batch's
    model, x, g = _case("bn2d")
    assert (_run(model, x[0::2], g[0::2])["out0"] - _run(*_case("bn2d"))["out0"][0::2]).abs().max() > 1e-2


@pytest.mark.parametrize("name", CASES)
def test_alone_the_synchronised_batch_norm_is_plain_batch_norm(name):
    model, x, g = _case(name)
    synced, _, _ = _case(name)
    plain = synced[0]
    cls = AllReduceBatchNormAct if isinstance(plain, BatchNormAct2d) else AllReduceBatchNorm
    norm = cls(plain.num_features, plain.eps, plain.momentum).double()
    norm.load_state_dict(plain.state_dict())
    if isinstance(plain, BatchNormAct2d):
        norm.drop, norm.act = plain.drop, plain.act
    synced[0] = norm
    a, b = _run(model, x, g), _run(synced, x, g)
    for k, v in a.items():
        assert torch.equal(b[k], v), k
    with synchronized_batchnorm(model):  # alone: nothing to convert
        assert not any(isinstance(m, SYNCED_TYPES) for m in model.modules())
