"""The stage evaluator: one growth stage of :class:`~nas_split.nni.strategy.SplittingDescent`, as NNI evaluates a
model (in the strategy's process on the sequential engine, in a trial process on ``ts``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nni
import torch
from nni.nas.evaluator import FunctionalEvaluator
from torch import nn

from ..checkpoints import load_stage, restore_optimizer, save_stage
from ..config import GrowthConfig, RunConfig, upgrade_stored
from ..cost import cost_model, count_macs
from ..data import DataSplits
from ..engine import grow_step
from ..experiment import example_inputs, run_meta
from ..records import StageRecord
from ..runlog import RunWriter
from ..stages import StageRunner
from ..surgery.export import build_spec
from ..surgery.sizes import layer_widths
from .space import BackboneSpace

__all__ = ["stage_environment", "train_stage", "stage_evaluator"]


def stage_environment(run: dict[str, Any]) -> tuple[RunConfig, DataSplits, torch.Tensor, int]:
    """``(configuration, data, example inputs, seed epochs)`` of the evaluator's ``run`` settings (dataset, recipe,
    ``seed_epochs``; :func:`stage_evaluator` writes them)."""
    from ..data import create_dataset

    cfg = RunConfig.model_validate({k: v for k, v in run.items() if k != "seed_epochs"})
    data = create_dataset(cfg.dataset, seed=cfg.train.seed, root=cfg.data_dir, **cfg.dataset_options)
    seed_epochs = run.get("seed_epochs") if run.get("seed_epochs") is not None else cfg.train.epochs
    return cfg, data, example_inputs(data), seed_epochs


def train_stage(model: nn.Module, run: dict[str, Any], stage: int = 0, checkpoint: str | None = None,
                previous: str | None = None, growth: dict[str, Any] | None = None,
                max_macs: float | None = None) -> dict:
    """The evaluator of one stage: [continue from ``previous``], [grow], train, test, save, report to NNI.

    ``previous`` is the previous stage's checkpoint (:mod:`nas_split.checkpoints`): its weights, its optimizer
    state (``growth.carry_optimizer``), the growth method's state (the fast analysis' directions, learning-rate
    slices) and the records so far.  Growth (stage ``> 0``) is the registered method's round of ``growth``
    (:func:`nas_split.grow_run.growth_method`), as in ``nas-split grow``, cut at the engine's ``max_macs``.  Stage
    0 starts from the seed's weights at the run's seed.  Saves the stage to ``checkpoint`` (the one stage
    checkpoint: what the next stage and ``nas-split retrain CHECKPOINT`` read).

    Reports (and returns) ``{"default": test top-1, "mmacs", "macs", "params", "energy_uj_est", "widths",
    "stage", "new_neurons", "checkpoint"}``; ``widths`` is the dash-joined output width of every conv/linear layer.
    """
    from ..grow_run import growth_method

    net = model.net if isinstance(model, BackboneSpace) else model
    cfg, data, x, seed_epochs = stage_environment(run)
    prev = load_stage(previous) if previous else None
    if prev is not None:  # the previous stage's weights (a ts trial builds the network from its sizes alone)
        net.load_state_dict(prev.model["state_dict"])
    elif stage == 0:  # the seed's weights depend on the run's seed only, on either engine (as in `nas-split grow`)
        torch.manual_seed(cfg.train.seed)
        net.load_state_dict(build_spec(net.nas_split_spec, import_factory=True).state_dict())
    out = os.environ.get("NNI_OUTPUT_DIR")  # the web UI's TensorBoard button reads <trial>/tensorboard
    writer = RunWriter(Path(out or ".", "tensorboard"), run_meta("nni", run, data.info),
                       resume=prev.results if prev is not None else None, enabled=bool(out))
    if len(writer.results["stages"]) < stage:  # after a stage of the older layout: only the epochs are known
        epochs = [seed_epochs if k == 0 else cfg.train.epochs for k in range(stage)]
        writer.results["stages"] = [StageRecord.elsewhere(k, e, sum(epochs[:k + 1])).to_dict()
                                    for k, e in enumerate(epochs)]
    runner = StageRunner(data=data, recipe=cfg.train, example_inputs=x, latency=cfg.latency,
                         cost_model=cost_model(cfg.cost_model), record=writer.stage, epoch_hook=writer.epoch,
                         records=[StageRecord.from_dict(s) for s in writer.results["stages"]])
    optimizer, extra, method_state = None, {}, {}
    if growth:
        g = GrowthConfig.model_validate(upgrade_stored(growth))
        method = growth_method(g)
        if prev is not None:
            method.load_state_dict(prev.method_state, net, x)
            optimizer = restore_optimizer(net, cfg.train, prev.optimizer) if g.carry_optimizer else None
        if stage > 0:
            extra = grow_step(runner, net, method, stage, max_macs, optimizer, count_macs(net, x)[0])
        method_state = method.state_dict()
    optimizer = runner.stage(net, "seed" if stage == 0 else "round", seed_epochs if stage == 0 else cfg.train.epochs,
                             optimizer, **extra)
    rec = runner.records[-1]
    writer.finish({"stage": stage, "dataset": cfg.dataset})
    if checkpoint:
        save_stage(checkpoint, stage, net, optimizer, writer.results, method_state)
    metric = rec.nni_metric(stage=stage, new_neurons=rec.new_neurons, checkpoint=checkpoint or "",
                            widths="-".join(str(w) for w in list(layer_widths(net).values())[:-1]))
    nni.report_final_result(metric)
    return metric


def stage_evaluator(dataset: str = "digits", train: dict[str, Any] | None = None, seed_epochs: int | None = None,
                    dataset_options: dict[str, Any] | None = None, data_dir: str | None = None,
                    latency: bool = False, cost_model: str = "horowitz-45nm") -> FunctionalEvaluator:
    """The evaluator :class:`~nas_split.nni.strategy.SplittingDescent` expects: trains each stage with nas-split's
    loop (:func:`train_stage`).

    Args:
        train: :class:`nas_split.training.TrainConfig` fields (``epochs`` per growth stage).
        seed_epochs: epochs of stage 0 (default ``train["epochs"]``).
        cost_model: what prices the records and energy-aware growth (:func:`nas_split.cost.cost_model`).
    """
    from ..training import TrainConfig

    recipe = TrainConfig.model_validate({"progress": False, **(train or {})}).model_dump()
    return FunctionalEvaluator(train_stage, run={"dataset": dataset, "dataset_options": dataset_options or {},
                                                 "data_dir": data_dir, "train": recipe, "seed_epochs": seed_epochs,
                                                 "latency": latency, "cost_model": cost_model})
