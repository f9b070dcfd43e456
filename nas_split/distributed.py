"""Growth across processes (Lightning Fabric DDP): the few collectives analysis, selection and the baselines need.

Under a data-parallel recipe (``train.devices > 1`` or ``train.num_nodes > 1`` with ``strategy=ddp``) every
process holds the same model.  To keep them the same through growth, nas-split

* draws **global batches** of ``world × batch_size`` samples with one seeded order on every process and gives
  process ``r`` the rows ``r, r + world, ...`` of each (:func:`shard`): the union of the shards is the batch a
  single process with ``world × batch_size`` would draw, for training, evaluation and analysis alike;
* **sums** every statistic a decision is made from over the processes, weighted by their samples
  (:func:`all_reduce_sum`): splitting matrices, the fast method's ``S v`` and ``λ``, Firefly's scores, GradMax's
  gradients, Taylor / Hessian pruning importances; every process then holds the spectra one process would
  compute on the union of the shards;
* with ``train.sync_batchnorm``, normalises every batch norm with the statistics of the whole batch while
  training (:mod:`nas_split.sync_batchnorm`), so a batch-norm model trains as on one process too;
* takes the decision on process 0 and **broadcasts** it (:func:`broadcast_object`), so float ties cannot make
  processes disagree; every process applies the same surgery, and the next fit wraps the new model for DDP;
* writes checkpoints, ``results.json``, models and TensorBoard events from process 0 only (:func:`is_main`).

Alone (no process group) every function here is the identity, so single-process code paths are unchanged.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["world_size", "rank", "is_main", "all_reduce_sum", "batch_share", "summed", "broadcast_object", "shard",
           "ShardedBatches", "make_fabric", "join", "multi_process", "launch"]

T = TypeVar("T")


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes in the job (1 without a process group)."""
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if _active() else 0


def is_main() -> bool:
    """Whether this process writes files: rank 0, or, before the process group is joined, a process that the
    launcher did not start as another rank (``RANK`` / ``LOCAL_RANK`` / ``NODE_RANK`` unset or 0)."""
    if _active():
        return dist.get_rank() == 0
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the processes, in place (and returned); the identity alone."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def batch_share(n: int, device: torch.device | str = "cpu") -> float:
    """This process's fraction ``n / Σ n`` of a batch whose shards hold ``n`` samples each (1.0 alone): the
    weight that turns a shard's mean into its part of the whole batch's mean."""
    if not _active():
        return 1.0
    return n / all_reduce_sum(torch.tensor(float(n), dtype=torch.float64, device=device)).item()


def summed(x: float) -> float:
    """A number added over the processes (e.g. MACs each counted on its own shard); ``x`` alone."""
    if not _active():
        return x
    return float(all_reduce_sum(torch.tensor(x, dtype=torch.float64)).item())


def broadcast_object(obj: T) -> T:
    """Process 0's ``obj`` on every process (picklable, small: keep tensors out of it)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(batch: Any, r: int | None = None, world: int | None = None) -> Any:
    """Rows ``r, r + world, ...`` of every tensor of ``batch`` (a tensor or a list / tuple of tensors)."""
    r = rank() if r is None else r
    world = world_size() if world is None else world
    if world == 1:
        return batch
    if torch.is_tensor(batch):
        return batch[r::world]
    return type(batch)(shard(b, r, world) for b in batch)


class ShardedBatches:
    """This process's share of every batch of ``loader``: iterate a loader of *global* batches
    (``world × batch_size``, one seeded order everywhere) and keep rows ``rank::world``."""

    def __init__(self, loader: Iterable, r: int | None = None, world: int | None = None):
        self.loader = loader
        self.r = rank() if r is None else r
        self.world = world_size() if world is None else world

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            yield shard(batch, self.r, self.world)


def make_fabric(cfg: Any) -> Any:
    """The Lightning Fabric of a training recipe (:class:`~nas_split.training.TrainConfig`).  A DDP strategy named
    by string (``ddp``, ``ddp_spawn``, ..., or ``auto`` where Fabric picks DDP) waits ``cfg.init_timeout`` seconds
    for the other processes to join, instead of torch's 30 minutes."""
    from datetime import timedelta

    from lightning_fabric import Fabric
    from lightning_fabric.strategies import STRATEGY_REGISTRY, DDPStrategy

    kwargs = {"accelerator": cfg.accelerator, "devices": cfg.devices, "num_nodes": cfg.num_nodes,
              "precision": cfg.precision}
    fabric = Fabric(strategy=cfg.strategy, **kwargs)
    name = cfg.strategy if cfg.strategy != "auto" else ("ddp" if type(fabric.strategy) is DDPStrategy else None)
    entry = dict.get(STRATEGY_REGISTRY, name) if name else None  # the registry's own .get() builds a strategy
    if entry is None or not issubclass(entry["strategy"], DDPStrategy):
        return fabric
    strategy = entry["strategy"](**entry["init_params"], timeout=timedelta(seconds=cfg.init_timeout))
    return Fabric(strategy=strategy, **kwargs)


def join(fabric: Any, cfg: Any) -> None:
    """``fabric.launch()``: start the local processes and join the process group.

    Raises:
        ConfigError: the group did not form within ``cfg.init_timeout`` seconds (an unreachable master, a missing
            node), one line naming the variables a launcher sets.
    """
    from .errors import ConfigError

    try:
        fabric.launch()
    except (dist.DistError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"the {cfg.num_nodes}-node process group did not form within train.init_timeout="
                          f"{cfg.init_timeout:g} s ({reason}); every node needs MASTER_ADDR, MASTER_PORT and its "
                          "NODE_RANK") from None


def multi_process(cfg: Any) -> bool:
    """Whether a training recipe (:class:`~nas_split.training.TrainConfig`) runs several processes."""
    if cfg.num_nodes > 1:
        return True
    if isinstance(cfg.devices, int) and cfg.devices in (0, 1):
        return False
    return make_fabric(cfg).world_size > 1


def launch(cfg: Any) -> None:
    """Start the processes a recipe asks for (Fabric's launcher re-runs this command once per extra local process;
    on several machines the launcher or scheduler sets ``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``,
    ``WORLD_SIZE`` and ``LOCAL_RANK``) and join the process group (:func:`join`: at most ``cfg.init_timeout``
    seconds).  Call it before anything is written."""
    if not multi_process(cfg) or _active():
        return
    join(make_fabric(cfg), cfg)
