"""The one training loop every method uses (seed training, growth stages, pruning fine-tune, scratch).

Built on Lightning Fabric: the loop stays ours, so an optimizer whose state was carried through a change of
parameter shapes (growth) can be passed back in, while ``accelerator`` / ``devices`` / ``strategy`` /
``num_nodes`` give multi-GPU and multi-node data-parallel training by flag (e.g. ``devices=4, strategy="ddp"``).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

from .distributed import ShardedBatches, join, make_fabric
from .errors import ConfigError, DivergedError
from .numerics import evaluating, like_model
from .sync_batchnorm import synchronized_batchnorm

__all__ = ["TrainConfig", "Trainer", "FitResult", "EvalResult", "DeviceBatches", "make_optimizer", "state_to_params",
           "lr_factor", "check_devices"]


class TrainConfig(BaseModel):
    """Training recipe (validated: unknown keys and wrong types are errors)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(30, ge=0, description="epochs per fit (one growth stage, or the whole run)")
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75], description="step schedule, epoch fractions")
    gamma: float = Field(0.1, gt=0, description="step schedule decay")
    warmup_epochs: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    seed: int = Field(0, ge=0, lt=2**32, description="seeds torch, numpy and the data order")
    num_workers: int = Field(0, ge=0)
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = Field(1, ge=1)
    init_timeout: float = Field(60.0, gt=0, description="seconds to wait for every process of a multi-process "
                                                        "recipe to join (an unreachable master fails after them)")
    precision: str = Field("32-true", description="Fabric precision; bf16-mixed = bf16 autocast for training "
                                                   "(growth analysis always runs in fp32)")
    channels_last: bool | None = Field(None, description="channels_last memory format for 4-D inputs; None: on "
                                                         "for models with 2-D convolutions trained on the CPU")
    device_data: bool = Field(True, description="hold in-memory datasets on the training device and draw batches "
                                                "there (one process, tensor datasets)")
    compile: bool = Field(False, description="torch.compile the training step's model (re-compiled every fit, so "
                                             "after each growth step)")
    check_every: int = Field(50, ge=1, description="steps between checks for a non-finite loss (host syncs)")
    sync_batchnorm: bool = Field(False, description="under several processes, normalise every batch norm with the "
                                                    "statistics of the whole batch (all processes' shards) while "
                                                    "training; see nas_split.sync_batchnorm")
    progress: bool = True


def check_devices(cfg: TrainConfig) -> None:
    """Refuse ``accelerator`` / ``devices`` / ``strategy`` / ``num_nodes`` / ``precision`` values that Lightning
    Fabric cannot use on this machine (a GPU asked for where there is none, a misspelt name), before anything is
    written; raises :class:`~nas_split.errors.ConfigError` naming the settings and Fabric's reason."""
    try:
        make_fabric(cfg)
    except (ValueError, RuntimeError, TypeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"train.accelerator={cfg.accelerator!r}, devices={cfg.devices!r}, strategy={cfg.strategy!r}, "
                          f"precision={cfg.precision!r} cannot be used here: {reason}") from None


def state_to_params(optimizer: torch.optim.Optimizer) -> None:
    """Move every per-parameter state tensor (momentum buffers, moments) to its parameter's device, in place;
    scalar ``step`` counters stay where the optimizer keeps them."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if torch.is_tensor(v) and v.dim() > 0 and v.device != p.device:
                    state[k] = v.to(p.device)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW; no weight decay on 1-D tensors (norms, biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(cfg: TrainConfig, progress: float, epochs: float | None = None) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1] of a schedule ``epochs`` long (default ``cfg.epochs``):
    linear warm-up over ``cfg.warmup_epochs`` of those epochs, then cosine / step / constant."""
    total = max(cfg.epochs if epochs is None else epochs, 1e-12)
    warm = cfg.warmup_epochs / total
    if progress < warm:
        return (progress + 1e-3) / warm
    if cfg.schedule == "cosine":
        p = (progress - warm) / max(1 - warm, 1e-12)
        return 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
    if cfg.schedule == "step":
        return cfg.gamma ** sum(progress >= m for m in cfg.milestones)
    return 1.0


@dataclass
class EvalResult:
    """Mean loss and top-1 accuracy over a loader."""

    loss: float
    acc: float
    n: int


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns: per-epoch history, the optimizer (with its state), wall time and the
    number of training samples processed (over all epochs and processes)."""

    history: list[dict] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    seconds: float = 0.0
    samples: int = 0


class Trainer:
    """Runs fits and evaluations with one :class:`TrainConfig` on the devices it names."""

    def __init__(self, cfg: TrainConfig | None = None):
        self.cfg = cfg or TrainConfig()
        self.fabric = make_fabric(self.cfg)
        if self.fabric.world_size > 1:
            join(self.fabric, self.cfg)
        self.fabric.seed_everything(self.cfg.seed, verbose=False)

    @property
    def device(self) -> torch.device:
        """Where models are trained."""
        return self.fabric.device

    def criterion(self) -> nn.Module:
        """Cross-entropy with the configured label smoothing."""
        return nn.CrossEntropyLoss(label_smoothing=self.cfg.label_smoothing)

    def fit(self, model: nn.Module, train_loader: DataLoader, val_loader: DataLoader | None = None,
            epochs: int | None = None, optimizer: torch.optim.Optimizer | None = None,
            on_epoch_end: Callable[[dict], None] | None = None, desc: str = "train",
            regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
            schedule: tuple[int, int] | None = None, rewarm_epochs: float = 0.0,
            train_step: Callable | None = None) -> FitResult:
        """Train ``model`` in place for ``epochs`` (default ``cfg.epochs``) with a fresh learning-rate schedule, or
        as a part of a longer one.

        Args:
            optimizer: an optimizer to continue (e.g. one whose state was carried through surgery); its learning
                rates are driven by the schedule. ``None`` builds one with :func:`make_optimizer`.
            on_epoch_end: called with each epoch's record ``{epoch, train_loss, train_acc, val_loss, val_acc, lr,
                seconds}``.
            regularizer: a term added to the loss, e.g. network slimming's L1 penalty on BN scales.
            schedule: ``(start, length)``: this fit is epochs ``start .. start + epochs`` of one schedule ``length``
                epochs long (a whole growth run under ``schedule_span: run``); default ``(0, epochs)``, a schedule of
                its own.  ``cfg.warmup_epochs`` are the first epochs of the schedule.
            rewarm_epochs: multiply the rate by a linear ramp ``min(1, (step + 1) / (rewarm_epochs x steps per
                epoch))`` at the start of this fit (a warm-up after a growth step).
            train_step: ``train_step(model, fmodel, x, y, criterion, no_sync) -> (loss, outputs)`` sets the gradients
                instead of ``backward`` of the criterion's loss (an anytime model's levels:
                :class:`nas_split.anytime_training.LevelStep`); ``no_sync()`` is a context without DDP's
                gradient sync.  Not with a regularizer or a precision that scales the loss.

        Returns:
            :class:`FitResult` with the history and the (raw, unwrapped) optimizer.
        """
        from tqdm.auto import tqdm

        epochs = self.cfg.epochs if epochs is None else epochs
        fmt = self.memory_format(model)
        model.to(self.device, memory_format=fmt)
        if train_step is not None and (regularizer is not None or self.cfg.precision in ("16-mixed", "16")):
            raise ConfigError("a training step of its own (anytime levels) takes no regularizer and no fp16 loss "
                              f"scaling (precision {self.cfg.precision!r}); use bf16-mixed or 32")
        optimizer = optimizer or make_optimizer(model, self.cfg)
        state_to_params(optimizer)  # a state loaded from a checkpoint before the model moved stays behind otherwise
        # the batch norms synchronised for this fit only: surgery, analysis and saved files see plain ones
        with synchronized_batchnorm(model, self.cfg.sync_batchnorm):
            step_model = torch.compile(model) if self.cfg.compile else model
            fmodel, fopt = self.fabric.setup(step_model, optimizer)
            loader = self.batches(train_loader, fmt)
            crit = self.criterion()
            per_epoch = max(len(loader), 1)
            start, length = schedule or (0, epochs)
            steps = per_epoch * max(length, 1)
            offset, ramp = per_epoch * start, rewarm_epochs * per_epoch
            result = FitResult(optimizer=optimizer)
            t0 = time.perf_counter()
            show = self.cfg.progress and self.fabric.is_global_zero
            bar = tqdm(total=per_epoch * max(epochs, 1), desc=desc, disable=not show, leave=False, dynamic_ncols=True)
            def no_sync():
                return self.fabric.no_backward_sync(fmodel, enabled=self.fabric.world_size > 1)

            step = 0
            for epoch in range(epochs):
                fmodel.train()
                te = time.perf_counter()
                loss_sum = torch.zeros((), device=self.device)
                correct = torch.zeros((), device=self.device)
                finite = torch.ones((), dtype=torch.bool, device=self.device)  # checked every check_every steps
                n = 0
                for x, y in loader:
                    lr = self.cfg.lr * lr_factor(self.cfg, (offset + step) / steps, length)
                    if ramp:
                        lr *= min(1.0, (step + 1) / ramp)
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                    fopt.zero_grad(set_to_none=True)
                    if train_step is None:
                        out = fmodel(x)
                        loss = crit(out, y)
                        self.fabric.backward(loss + regularizer(model) if regularizer is not None else loss)
                    else:
                        loss, out = train_step(model, fmodel, x, y, crit, no_sync)
                    fopt.step()
                    finite &= torch.isfinite(loss.detach())
                    loss_sum += loss.detach() * len(y)
                    correct += (out.detach().argmax(1) == y).sum()
                    n += len(y)
                    step += 1
                    bar.update(1)
                    if step % self.cfg.check_every == 0:
                        self._check_finite(finite, loss_sum, desc, epoch, step)
                self._check_finite(finite, loss_sum, desc, epoch, step)
                result.samples += n * self.fabric.world_size
                rec = {"epoch": epoch, "train_loss": (loss_sum / max(n, 1)).item(),
                       "train_acc": (correct / max(n, 1)).item(), "lr": lr if n else self.cfg.lr,
                       "seconds": time.perf_counter() - te}
                if val_loader is not None:
                    ev = self.evaluate(model, val_loader)
                    rec.update(val_loss=ev.loss, val_acc=ev.acc)
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}", acc=f"{rec.get('val_acc', rec['train_acc']):.3f}")
                result.history.append(rec)
                if on_epoch_end is not None:
                    on_epoch_end(rec)
            bar.close()
        if fmt != torch.contiguous_format:  # growth, checkpoints and a resumed run all see one layout
            model.to(memory_format=torch.contiguous_format)
        result.seconds = time.perf_counter() - t0
        return result

    @staticmethod
    def _check_finite(finite: torch.Tensor, loss_sum: torch.Tensor, desc: str, epoch: int, step: int) -> None:
        if not bool(finite):  # one host sync per check, not per step
            raise DivergedError(f"{desc}: loss became {'nan' if loss_sum.isnan() else loss_sum.item()} "
                                f"at epoch {epoch}, by step {step}")

    def memory_format(self, model: nn.Module) -> torch.memory_format:
        """The layout of a fit: as ``cfg.channels_last`` says, or by default ``channels_last`` for a model with 2-D
        convolutions on the CPU (1.40x the steps/s of the contiguous loop there) and ``contiguous_format`` on a GPU
        (where channels_last ran at 0.86x on an H100; docs/gpu.md).  The model is back in
        ``contiguous_format`` when the fit returns."""
        use = self.cfg.channels_last
        if use is None:
            use = self.device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())
        return torch.channels_last if use else torch.contiguous_format

    def batches(self, loader: DataLoader, fmt: torch.memory_format = torch.contiguous_format) -> Iterable:
        """The training batches of ``loader`` on the device: :class:`DeviceBatches` when the dataset is a tensor
        dataset that may live there (``cfg.device_data``, one process), else the loader's batches moved there.

        Under several processes ``loader`` draws *global* batches (``world × batch_size``, the same seeded order
        in every process) and this process trains on its rows ``rank::world``
        (:class:`~nas_split.distributed.ShardedBatches`): the processes together see exactly the batches one
        process with the global batch size would."""
        if self.cfg.device_data and self.fabric.world_size == 1 and DeviceBatches.supports(loader):
            return DeviceBatches(loader, self.device, fmt)
        return _Formatted(ShardedBatches(loader), fmt, self.device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> EvalResult:
        """Loss and top-1 accuracy of ``model`` on ``loader`` (eval mode; under several processes each evaluates
        its rows of every batch and the sums are added)."""
        model.to(self.device)  # in the layout it has (channels_last inside a fit)
        crit = nn.CrossEntropyLoss(reduction="sum")
        stats = torch.zeros(3, device=self.device, dtype=torch.float64)
        with evaluating(model):
            for x, y in ShardedBatches(loader):
                x, y = like_model(model, x), y.to(self.device)
                out = model(x)
                stats += torch.stack([crit(out, y).double(), (out.argmax(1) == y).sum().double(),
                                      torch.tensor(len(y), device=self.device, dtype=torch.float64)])
        stats = self.fabric.all_reduce(stats, reduce_op="sum") if self.fabric.world_size > 1 else stats
        n = max(stats[2].item(), 1.0)
        return EvalResult(stats[0].item() / n, stats[1].item() / n, int(stats[2].item()))


def _to(x: torch.Tensor, device: torch.device, fmt: torch.memory_format) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=fmt) if x.dim() == 4 else x


class _Formatted:
    """Batches of a loader on ``device`` in the given memory format."""

    def __init__(self, loader: Iterable, fmt: torch.memory_format, device: torch.device):
        self.loader, self.fmt, self.device = loader, fmt, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        for x, y in self.loader:
            yield (_to(x, self.device, self.fmt), y.to(self.device, non_blocking=True))


class DeviceBatches:
    """The batches of a ``DataLoader`` over a ``TensorDataset``, drawn from copies of its tensors on ``device``.

    The batch order is the loader's own: every epoch draws the loader's shared seed from its generator (as a
    ``DataLoader`` iterator does) and then iterates its ``batch_sampler``, so a run gives the same batches as
    iterating the loader, without per-sample indexing, collation or a host-to-device copy per step.
    """

    def __init__(self, loader: DataLoader, device: torch.device, fmt: torch.memory_format = torch.contiguous_format):
        self.loader, self.fmt = loader, fmt
        self.tensors = [t.to(device) for t in loader.dataset.tensors]

    @staticmethod
    def supports(loader: Iterable) -> bool:
        """A single-process ``DataLoader`` over a ``TensorDataset`` with the default collation."""
        return (isinstance(loader, DataLoader) and isinstance(loader.dataset, TensorDataset)
                and loader.num_workers == 0 and loader.batch_sampler is not None
                and loader.collate_fn is default_collate)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        torch.empty((), dtype=torch.int64).random_(generator=self.loader.generator)  # as _BaseDataLoaderIter
        device = self.tensors[0].device
        for idx in self.loader.batch_sampler:
            i = torch.as_tensor(idx, device=device)
            yield [_to(t.index_select(0, i), device, self.fmt) for t in self.tensors]
