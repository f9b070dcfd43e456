"""Setting up a ``nas-split nni`` experiment: the space, the evaluator and the strategy, checked before it starts.

NNI 3.0 notes (docs/nni.md): its web server listens on every interface (there is no host option), and
``nnictl`` fails on setuptools >= 81; a finished experiment is viewed again with
``NasExperiment(..., id=ID).view(port)`` (:func:`build_experiment` with ``exp_id``).
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from nni.nas.evaluator import FunctionalEvaluator

from ..config import ConfigError, NniRunConfig
from .evaluator import stage_environment, stage_evaluator
from .space import BackboneSpace
from .strategy import SplittingDescent

__all__ = ["check_port", "check_experiment", "build_experiment", "run_nni"]


def check_port(port: int) -> None:
    """Refuse a port that is taken (NNI would fail later, after starting its manager)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            raise ConfigError(f"port {port} is in use; pass another --port") from None
    if port <= 1024:
        raise ConfigError(f"port {port}: NNI's manager needs a port above 1024")


def check_experiment(space: BackboneSpace, evaluator: FunctionalEvaluator, strategy: SplittingDescent) -> None:
    """Before an experiment starts: the seed is growable and under the budget (clear errors otherwise)."""
    from ..grow_run import validate_growth

    _, _, x, _ = stage_environment(evaluator.arguments["run"])
    validate_growth(strategy.growth, space.net, x)  # NotGrowableError / ConfigError name the problem


def _experiment(cfg: NniRunConfig, space: BackboneSpace, evaluator: FunctionalEvaluator, strategy: SplittingDescent,
                exp_id: str | None = None) -> Any:
    """The ``NasExperiment`` of ``cfg.engine`` (sequential: ``raw`` models in this process; ts: one trial each)."""
    from nni.nas.experiment import NasExperiment, NasExperimentConfig

    config = NasExperimentConfig("sequential", "raw") if cfg.engine == "sequential" else \
        NasExperimentConfig("ts", "simplified", "local")
    config.experiment_working_directory = str(Path(cfg.out, "nni-experiments").resolve())
    config.max_trial_number = cfg.growth.rounds + 1
    if cfg.engine == "ts":
        config.trial_concurrency = 1
    return NasExperiment(space, evaluator, strategy, config, id=exp_id)


def build_experiment(cfg: NniRunConfig, exp_id: str | None = None,
                     check: bool = True) -> tuple[Any, SplittingDescent]:
    """``(NasExperiment, strategy)`` for a ``nas-split nni`` configuration, checked before anything starts
    (``exp_id``: the experiment to resume or view).  The stages are saved in ``<out>/checkpoints``."""
    from ..checkpoints import CHECKPOINT_DIR
    from ..experiment import prepare

    if cfg.growth.anytime is not None:
        raise ConfigError("growth.anytime is not supported by nas-split nni yet (its stages are separate trials); "
                          "grow an anytime family with nas-split grow, run or compare")
    p = prepare(cfg)
    strategy = SplittingDescent(checkpoint_dir=Path(cfg.out, CHECKPOINT_DIR).resolve(),
                                **cfg.growth.model_dump(exclude_unset=True))  # as the user gave them
    space = BackboneSpace(p.model.nas_split_spec)
    space.net.load_state_dict(p.model.state_dict())
    evaluator = stage_evaluator(cfg.dataset, cfg.train.model_dump(), cfg.growth.seed_epochs, cfg.dataset_options,
                                cfg.data_dir, cfg.latency, cfg.cost_model)
    if check:
        check_experiment(space, evaluator, strategy)
        if cfg.engine == "ts":
            check_port(cfg.port)
    return _experiment(cfg, space, evaluator, strategy, exp_id), strategy


def run_nni(cfg: NniRunConfig) -> tuple[Any, SplittingDescent]:
    """Run a ``nas-split nni`` experiment to the end; returns the experiment and its strategy."""
    exp, strategy = build_experiment(cfg)
    exp.run(port=cfg.port)
    return exp, strategy
