"""``nas-split compare --engine nni``: compare's runs as NNI trials.

:func:`nas_split.compare.run_compare` plans the runs, skips the finished ones and adds the retrain phase, as on
the local engine; this module only supplies its executor (:data:`nas_split.compare.Executor`):
:func:`trial_executor` submits a phase's unfinished runs as trials of one experiment on the local training
service (``trial_concurrency = jobs``), each trial one ``nas-split run`` (:func:`compare_trial`).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import nni
import torch
from nni.nas.evaluator import FunctionalEvaluator
from nni.nas.execution.event import FinalMetricEvent, ModelEventType
from nni.nas.nn.pytorch import ModelSpace
from nni.nas.space import SimplifiedModelSpace
from nni.nas.strategy import Strategy
from torch import nn

from .._io import atomic_write_json
from ..compare import CompareConfig, Executor, PlannedRun, finished_result
from ..records import RunResult
from .experiment import check_port

__all__ = ["compare_trial", "trial_executor", "run_trials"]


def compare_trial(model: nn.Module, config: dict[str, Any], threads: int = 1) -> dict:
    """The evaluator of a ``compare`` trial: one ``nas-split run`` (``config`` = its MethodRunConfig); reports
    the last stage's metric with the method, seed, wall time and run directory."""
    from ..compare import run_one

    res = RunResult.from_dict(run_one(config, threads))
    metric = res.last.nni_metric(method=config["method"], seed=config["train"]["seed"],
                                 wall_seconds=res.wall_seconds, run_dir=config["out"])
    nni.report_final_result(metric)
    return metric


class _Dummy(ModelSpace):
    """The architecture of a ``compare`` trial is its run configuration; NNI needs a model space all the same."""

    def __init__(self, key: str = ""):
        super().__init__()
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _CompareStrategy(Strategy):
    """Submits every planned run as one trial; at most ``trial_concurrency`` run at once."""

    def __init__(self, configs: list[tuple[str, dict]], threads: int):
        super().__init__()
        self.configs, self.threads = configs, threads
        self.done: dict[str, dict] = {}

    def _initialize(self, model_space, engine):
        engine.register_model_event_callback(ModelEventType.FinalMetric, self._on_final)
        return model_space

    def _on_final(self, event: FinalMetricEvent) -> None:
        raw = event.metric if not isinstance(event.metric, str) else json.loads(event.metric)
        self.done[raw["run_dir"]] = raw

    def _run(self) -> None:
        submitted = []
        for key, config in self.configs:
            if not self.wait_for_resource():
                break
            evaluator = FunctionalEvaluator(compare_trial, config=config, threads=self.threads)
            m = SimplifiedModelSpace.from_model(_Dummy(key), evaluator).freeze({})
            m.sample = {"run": key}
            self.engine.submit_models(m)
            submitted.append(m)
        self.engine.wait_models(*submitted)

    def state_dict(self) -> dict:
        """Nothing to resume: compare skips the runs that finished."""
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to restore (see :meth:`state_dict`)."""


def _save_trials(port: int, path: Path) -> None:
    """The NNI manager's trial list (ids, status, start and end times, final metrics), kept after it stops."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/nni/trial-jobs", timeout=10) as r:
        trials = json.loads(r.read())
    atomic_write_json(path, [{k: t.get(k) for k in ("trialJobId", "status", "startTime", "endTime",
                                                    "finalMetricData")} for t in trials])


def run_trials(cfg: CompareConfig, todo: list[PlannedRun], threads: int, done: Callable[[PlannedRun, dict], None],
               port: int = 8080) -> None:
    """An :data:`~nas_split.compare.Executor`: ``todo`` as the trials of one NNI experiment on ``port``
    (``trial_concurrency = cfg.jobs``, files in ``<out>/nni-experiments``, the trial list kept in
    ``<out>/nni_trials.json``); ``done`` is called with each run's results once the experiment ends.

    Raises:
        RuntimeError: a trial did not finish its run.
    """
    from nni.nas.experiment import NasExperiment, NasExperimentConfig

    out = Path(cfg.out)
    config = NasExperimentConfig("ts", "simplified", "local")
    config.experiment_working_directory = str((out / "nni-experiments").resolve())
    config.trial_concurrency = cfg.jobs
    config.max_trial_number = len(todo)
    strategy = _CompareStrategy([(r.key, r.config.model_dump()) for r in todo], threads)
    exp = NasExperiment(_Dummy(), FunctionalEvaluator(compare_trial, config={}), strategy, config)
    try:
        exp.run(port=port)
        _save_trials(port, out / "nni_trials.json")
    finally:
        exp.stop()
    for r in todo:
        res = finished_result(r)
        if res is None:
            raise RuntimeError(f"trial for {r.key} did not finish; see {out / 'nni-experiments'}")
        done(r, res)


def trial_executor(port: int = 8080) -> Executor:
    """The executor of ``compare --engine nni`` (:func:`run_trials` on ``port``); refuses a port in use now,
    before anything runs."""
    check_port(port)
    return partial(run_trials, port=port)
