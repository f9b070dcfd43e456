"""Set up and run one training experiment: validate everything first, then train into a fresh run directory.

Nothing is written until the dataset loads, the backbone builds and a forward pass of a real sample succeeds;
the run is written into a temporary sibling directory that is renamed to the final name only when it completes,
so an output directory never holds a half-written run.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

import search_spaces

from ._io import output_lock, remove_path
from .config import AnytimeConfig, ConfigError, MethodRunConfig, RunConfig, validation_message
from .cost import CostModel, cost_model
from .data import DatasetInfo, DataSplits, create_dataset
from .distributed import is_main
from .errors import DivergedError, NasSplitError
from .numerics import evaluating
from .runlog import RunWriter
from .stages import StageRunner
from .surgery.export import save_grown
from .training import check_devices

__all__ = ["MODEL_FILE", "Prepared", "BackboneMismatchError", "prepare", "example_inputs", "run_meta", "check_out_dir",
           "run_train", "method_context", "run_method"]


#: The final model of a ``nas-split run`` directory (:func:`nas_split.save_grown` format).
MODEL_FILE = "model.pt"


class BackboneMismatchError(NasSplitError, ValueError):
    """The backbone cannot take the dataset's samples."""


@dataclass
class Prepared:
    """A validated experiment: data, model and one batch of example inputs."""

    data: DataSplits
    model: nn.Module
    example_inputs: torch.Tensor
    cost_model: CostModel


def prepare(cfg: RunConfig) -> Prepared:
    """Check the device settings, load the dataset, build the backbone for it and check that they fit (raises a
    :class:`~nas_split.errors.NasSplitError` before anything is written)."""
    check_devices(cfg.train)
    data = create_dataset(cfg.dataset, seed=cfg.train.seed, root=cfg.data_dir, **_opts(cfg.dataset_options, "dataset"))
    space = search_spaces.info(cfg.backbone)
    info = data.info
    if space.input_kind != info.kind:
        raise BackboneMismatchError(f"backbone {cfg.backbone!r} takes {space.input_kind} inputs but dataset "
                                    f"{info.name!r} gives {info.kind} samples {info.input_shape}")
    opts = _opts(cfg.backbone_options, "backbone")
    if opts.get("in_chans", info.in_chans) != info.in_chans:
        raise BackboneMismatchError(f"backbone_options.in_chans={opts['in_chans']} does not fit dataset "
                                    f"{info.name!r}, whose samples have {info.in_chans} channels")
    opts.pop("in_chans", None)
    torch.manual_seed(cfg.train.seed)  # the seed's initial weights depend on the run's seed only
    try:
        model = search_spaces.create(cfg.backbone, num_classes=info.num_classes, in_chans=info.in_chans,
                                     input_size=info.input_size, **opts)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"backbone_options for {cfg.backbone!r}: {str(e).splitlines()[0]}") from None
    x = example_inputs(data)
    try:
        with evaluating(model), torch.no_grad():
            model(x)
    except RuntimeError as e:
        raise BackboneMismatchError(f"backbone {cfg.backbone!r} does not fit dataset {info.name!r} "
                                    f"(samples {info.input_shape}): {str(e).splitlines()[0]}") from None
    return Prepared(data, model, x, cost_model(cfg.cost_model))


def example_inputs(data: DataSplits) -> torch.Tensor:
    """The batch a run traces, counts and checks its models with: the first two training samples."""
    return torch.stack([data.train[i][0] for i in range(min(2, len(data.train)))])


def run_meta(command: str, config: dict[str, Any], info: DatasetInfo, **more: Any) -> dict[str, Any]:
    """The top-level fields of a run's ``results.json`` (:class:`~nas_split.runlog.RunWriter`'s ``meta``): the
    command, its configuration, the dataset's name, kind, input shape and classes, then ``more`` (``backbone``,
    ``method``, ``stage``, ...)."""
    return {"command": command, "config": config,
            "dataset": {"name": info.name, "kind": info.kind, "input_shape": list(info.input_shape),
                        "num_classes": info.num_classes}, **more}


def _opts(options: dict, what: str) -> dict:
    if not isinstance(options, dict):
        raise ConfigError(f"{what}_options must be a mapping")
    return dict(options)


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing non-empty output directory unless ``overwrite`` (process 0 checks for a multi-process
    run: the others may already see the directory it made)."""
    p = Path(out)
    if is_main() and p.exists() and (not p.is_dir() or any(p.iterdir())) and not overwrite:
        raise ConfigError(f"output directory {str(p)!r} already exists and is not empty; "
                          "choose another --out or pass --overwrite")
    return p


def _publish(tmp: Path, out: Path) -> None:
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        remove_path(old)
    else:
        tmp.rename(out)


def _publish_run(cfg: RunConfig, overwrite: bool, meta: dict, body) -> dict:
    """Write a run into a temporary sibling of ``cfg.out`` with ``body(writer)`` and rename it when done.

    The output is locked for the whole run (:func:`nas_split._io.output_lock`); a run that fails leaves nothing
    behind (its temporary directory is removed), so ``cfg.out`` holds a complete run or what it held before.
    """
    if not is_main():  # the other processes of a multi-process run compute along and write nothing
        writer = RunWriter(cfg.out, meta, enabled=False)
        return writer.finish(body(writer))
    with output_lock(cfg.out):
        out = check_out_dir(cfg.out, overwrite)
        tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
        try:
            writer = RunWriter(tmp, meta)
            hparams = body(writer)
            results = writer.finish(hparams)
            _publish(tmp, out)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, FloatingPointError):
                raise DivergedError(f"{e}; nothing was written: lower the learning rate (--lr) and run again") \
                    from e
            raise
    return results


def method_context(cfg: MethodRunConfig, p: Prepared, record=lambda rec: None):
    """A :class:`~nas_split.methods.MethodContext` for ``cfg``, its method, and the method's checks done."""
    from .cost import count_macs
    from .methods import GrowthMethod, MethodContext, configure_depth, create_method, split_options

    info = p.data.info
    base = {k: v for k, v in cfg.backbone_options.items() if k != "in_chans"}

    def build(**over):
        torch.manual_seed(cfg.train.seed)
        return search_spaces.create(cfg.backbone, num_classes=info.num_classes, in_chans=info.in_chans,
                                    input_size=info.input_size, **{**base, **over})

    def build_width(mult: float, **over):
        return build(**{"width_mult": mult, "widths": None} if "widths" in base else {"width_mult": mult}, **over)

    options, harness = split_options(cfg.method_options)
    anytime = _anytime(cfg.method, harness.get("anytime"))
    max_blocks = _max_blocks(cfg.method, harness.get("depth", False), harness.get("max_blocks_per_stage"))
    try:
        method = create_method(cfg.method, **options)
        seed = build(**cfg.seed_options)
    except (TypeError, ValueError) as e:  # option names and values the method or the builder refuses
        if isinstance(e, NasSplitError):
            raise
        raise ConfigError(f"options of {cfg.method!r} or seed_options: {str(e).splitlines()[0]}") from None
    ctx = MethodContext(data=p.data, recipe=cfg.train, example_inputs=p.example_inputs, record=record,
                        latency=cfg.latency, cost_model=p.cost_model,
                        build_seed=lambda **over: build(**{**cfg.seed_options, **over}), build_full=build,
                        build_width=build_width,
                        seed_epochs=cfg.seed_epochs if cfg.seed_epochs is not None else cfg.train.epochs,
                        epochs=cfg.train.epochs, rounds=cfg.rounds,
                        finetune_epochs=cfg.finetune_epochs, target_mmacs=cfg.target_mmacs,
                        growth_warmup_epochs=cfg.growth_warmup_epochs, anytime=anytime)
    if anytime is not None and not isinstance(method, GrowthMethod):
        raise ConfigError(f"method_options.anytime applies to growth methods, not to {cfg.method!r}")
    configure_depth(method, max_blocks, anytime is not None, key="method_options.depth")
    if cfg.schedule_span == "run":  # one schedule over every epoch the run trains
        ctx.schedule_epochs = ctx.scratch_epochs
    method.check(ctx, count_macs(seed, p.example_inputs)[0], count_macs(p.model, p.example_inputs)[0])
    return ctx, method


def _max_blocks(method: str, depth: Any, max_blocks: Any) -> int:
    """New blocks per round from ``method_options.depth`` / ``max_blocks_per_stage`` (0: width only)."""
    if not isinstance(depth, bool):
        raise ConfigError(f"method_options.depth of {method!r} is true or false, got {depth!r}")
    if max_blocks is None:
        return int(depth)
    if not depth:
        raise ConfigError(f"method_options.max_blocks_per_stage of {method!r} applies with depth: true")
    if isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1:
        raise ConfigError(f"method_options.max_blocks_per_stage of {method!r} is a positive integer, got "
                          f"{max_blocks!r}")
    return max_blocks


def _anytime(method: str, options: Any) -> AnytimeConfig | None:
    """``method_options.anytime`` checked (``true`` or ``{}``: the defaults); ``None`` without it."""
    if options is None or options is False:
        return None
    try:
        return AnytimeConfig.model_validate({} if options is True else options)
    except ValidationError as e:
        raise ConfigError(f"method_options.anytime of {method!r}: {validation_message(e)}") from None


def run_method(cfg: MethodRunConfig, overwrite: bool = False, prepared: Prepared | None = None) -> dict:
    """Run one registered method and write its run directory (``cfg.out``): ``results.json``, the TensorBoard
    events and the final model (:data:`MODEL_FILE`, :func:`nas_split.save_grown`: what ``nas-split retrain``
    rebuilds).  Returns ``results.json``."""
    from .methods import FromScratch

    check_out_dir(cfg.out, overwrite)
    p = prepared or prepare(cfg)
    ctx, method = method_context(cfg, p)
    meta = run_meta("run", cfg.model_dump(), p.data.info, backbone=cfg.backbone, method=cfg.method,
                    from_scratch=isinstance(method, FromScratch))

    def body(writer):
        ctx.record, ctx.epoch_hook = writer.stage, writer.epoch
        model = method.run(ctx)
        save_grown(model, writer.run_dir / MODEL_FILE)
        reached = ctx.records[-1].mmacs
        return {"method": cfg.method, "dataset": cfg.dataset, "backbone": cfg.backbone, "seed": cfg.train.seed,
                "target_mmacs": cfg.target_mmacs or 0.0, "rounds": cfg.rounds,
                # the relative miss of the MAC target (0 without one): compare marks runs beyond its tolerance
                "target_error": reached / cfg.target_mmacs - 1 if cfg.target_mmacs else 0.0}

    return _publish_run(cfg, overwrite, meta, body)


def run_train(cfg: RunConfig, overwrite: bool = False, prepared: Prepared | None = None) -> dict:
    """Train ``cfg.backbone`` on ``cfg.dataset`` and write the run directory ``cfg.out``.

    Returns:
        The content of ``results.json``.
    """
    check_out_dir(cfg.out, overwrite)
    p = prepared or prepare(cfg)

    def body(writer):
        runner = StageRunner(data=p.data, recipe=cfg.train, example_inputs=p.example_inputs, record=writer.stage,
                             epoch_hook=writer.epoch, latency=cfg.latency, cost_model=p.cost_model)
        runner.stage(p.model, "train", cfg.train.epochs)
        return {"method": "train", "dataset": cfg.dataset, "backbone": cfg.backbone, "epochs": cfg.train.epochs,
                "lr": cfg.train.lr, "seed": cfg.train.seed}

    return _publish_run(cfg, overwrite, run_meta("train", cfg.model_dump(), p.data.info, backbone=cfg.backbone),
                        body)
