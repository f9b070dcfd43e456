"""Splitting steepest descent as an NNI 3.0 NAS strategy; the harness's runs as NNI trials.

The maths stays in :mod:`nas_split` (no NNI there); this module is the thin adapter.  One model is submitted per
growth stage:

* **sequential engine** (default, model format ``raw``): :class:`SplittingDescent` keeps the live network, grows
  it between stages (analyze -> select -> split) and submits it "custom-frozen", so the engine trains that very
  object in this process;
* **training-service engine** (``ts``, web UI): each stage is a trial of :class:`BackboneSpace` rebuilt from its
  per-layer sizes; the trial warm-starts from the previous stage's checkpoint, computes the split, trains and
  reports ``{"default": top-1, "mmacs", "params", "energy_uj_est", "widths", ...}``.

The same strategy class serves both.  Stage history (sizes, checkpoints, metrics) lives in the strategy's
``state_dict`` because the sequential engine does not restore its own.  :func:`stage_evaluator` builds the
evaluator; :func:`run_compare_nni` dispatches ``nas-split compare`` runs as trials.

NNI 3.0 notes (docs/nni.md): its web server listens on every interface (there is no host option), and
``nnictl`` fails on setuptools >= 81; a finished experiment is viewed again with
``NasExperiment(..., id=ID).view(port)``.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

with warnings.catch_warnings():  # NNI 3.0 warns about torch's Buffer at import
    warnings.simplefilter("ignore")
    import nni
    from nni.nas.evaluator import FunctionalEvaluator
    from nni.nas.execution.event import FinalMetricEvent, ModelEventType
    from nni.nas.nn.pytorch import ModelSpace
    from nni.nas.space import ModelStatus, RawFormatModelSpace, SimplifiedModelSpace
    from nni.nas.strategy import Strategy

from ._io import atomic_torch_save, atomic_write_json
from .config import ConfigError, GrowthConfig, NniRunConfig, validation_message
from .cost import cost_model, count_macs
from .engine import grow_step, reached, round_cap
from .records import RunResult, StageRecord
from .runlog import RunWriter
from .stages import StageRunner
from .surgery.export import build_spec, save_grown
from .surgery.sizes import apply_sizes, layer_widths

__all__ = ["BackboneSpace", "SplittingDescent", "stage_evaluator", "train_stage", "check_port",
           "check_experiment", "run_nni", "run_compare_nni", "compare_trial"]

_log = logging.getLogger(__name__)


class BackboneSpace(ModelSpace):
    """A ``search_spaces`` backbone as an NNI model space without mutables; per-layer sizes are arguments.

    Args:
        spec: how to build the seed (``model.nas_split_spec`` of :func:`search_spaces.create`).
        sizes: ``{layer: [out, in]}`` of a grown stage (:func:`nas_split.surgery.layer_sizes`); the weights
            are then uninitialised until a checkpoint is loaded.
    """

    def __init__(self, spec: dict[str, Any], sizes: dict[str, list[int]] | None = None):
        super().__init__()
        self.net = build_spec(spec, import_factory=True)  # the caller's own spec, not a file's
        if sizes:
            apply_sizes(self.net, sizes)
        self.net.nas_split_spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _environment(run: dict[str, Any], stages_before: int):
    """Data, example inputs and a stage runner positioned at stage ``stages_before`` of the run ``run``."""
    from .config import RunConfig
    from .data import create_dataset

    cfg = RunConfig.model_validate({k: v for k, v in run.items() if k != "seed_epochs"})
    data = create_dataset(cfg.dataset, seed=cfg.train.seed, root=cfg.data_dir, **cfg.dataset_options)
    x = torch.stack([data.train[i][0] for i in range(min(2, len(data.train)))])
    seed_epochs = run.get("seed_epochs") if run.get("seed_epochs") is not None else cfg.train.epochs
    epochs = [seed_epochs if k == 0 else cfg.train.epochs for k in range(stages_before)]
    records = [StageRecord.elsewhere(k, e, sum(epochs[:k + 1])) for k, e in enumerate(epochs)]
    runner = StageRunner(data=data, recipe=cfg.train, example_inputs=x, latency=cfg.latency, records=records,
                         cost_model=cost_model(cfg.cost_model))
    return cfg, x, runner, seed_epochs


def _state_path(checkpoint: str) -> str:
    """Where a stage keeps what the next stage carries on: the optimizer state and the analysis directions."""
    return str(Path(checkpoint).with_suffix(".state.pt"))


def train_stage(model: nn.Module, run: dict[str, Any], stage: int = 0, checkpoint: str | None = None,
                init_checkpoint: str | None = None, growth: dict[str, Any] | None = None,
                max_macs: float | None = None, state_checkpoint: str | None = None) -> dict:
    """The evaluator of one stage: [load ``init_checkpoint``'s weights (ts engine)], [grow], train, test, save,
    report to NNI.

    Growth is the registered splitting method's round (:class:`nas_split.methods.SplittingMethod`), as in
    ``nas-split grow``, on both engines: with the previous stage's optimizer state (``growth.carry_optimizer``)
    and fast-analysis directions from ``state_checkpoint``, cut at the round's ``max_macs``.  Saves the stage's
    model to ``checkpoint`` and, beside it (``.state.pt``), its optimizer state, directions, the evaluator's
    ``run`` (dataset and recipe) and the epochs trained so far (what :func:`nas_split.retrain.retrain_config`
    reads for an exported stage).

    Reports (and returns) ``{"default": test top-1, "mmacs", "macs", "params", "energy_uj_est", "widths",
    "stage", "new_neurons", "checkpoint"}``; ``widths`` is the dash-joined output width of every conv/linear layer.
    """
    from .grow_run import growth_method
    from .training import make_optimizer

    net = model.net if isinstance(model, BackboneSpace) else model
    cfg, x, runner, seed_epochs = _environment(run, stage)
    if init_checkpoint:
        net.load_state_dict(torch.load(init_checkpoint, weights_only=True)["state_dict"])
    elif stage == 0:  # the seed's weights depend on the run's seed only, on either engine (as in `nas-split grow`)
        torch.manual_seed(cfg.train.seed)
        net.load_state_dict(build_spec(net.nas_split_spec, import_factory=True).state_dict())
    optimizer, extra, method_state = None, {}, {}
    if growth:
        g = GrowthConfig.model_validate(growth)
        method = growth_method(g)
        state = torch.load(state_checkpoint, weights_only=True) if state_checkpoint else {}
        method.load_state_dict(state, net, x)
        if g.carry_optimizer and state.get("optimizer") is not None:
            optimizer = make_optimizer(net, cfg.train)
            optimizer.load_state_dict(state["optimizer"])
        extra = grow_step(runner, net, method, stage, max_macs, optimizer, count_macs(net, x)[0])
        method_state = method.state_dict()
    writer = None
    if os.environ.get("NNI_OUTPUT_DIR"):  # the web UI's TensorBoard button reads <trial>/tensorboard
        writer = RunWriter(Path(os.environ["NNI_OUTPUT_DIR"], "tensorboard"), {"command": "nni", "stage": stage})
        runner.record, runner.epoch_hook = writer.stage, writer.epoch
    optimizer = runner.stage(net, "seed" if stage == 0 else "round", seed_epochs if stage == 0 else cfg.train.epochs,
                             optimizer, **extra)
    rec = runner.records[-1]
    if writer is not None:
        writer.finish({"stage": stage, "dataset": cfg.dataset})
    if checkpoint:
        save_grown(net, checkpoint)
        atomic_torch_save(_state_path(checkpoint), {
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            **method_state, "run": run, "epochs_total": rec.epochs_total})  # what `nas-split retrain CHECKPOINT` reads
    metric = rec.nni_metric(stage=stage, new_neurons=rec.new_neurons, checkpoint=checkpoint or "",
                            widths="-".join(str(w) for w in list(layer_widths(net).values())[:-1]))
    nni.report_final_result(metric)
    return metric


def stage_evaluator(dataset: str = "digits", train: dict[str, Any] | None = None, seed_epochs: int | None = None,
                    dataset_options: dict[str, Any] | None = None, data_dir: str | None = None,
                    latency: bool = False, cost_model: str = "horowitz-45nm") -> FunctionalEvaluator:
    """The evaluator :class:`SplittingDescent` expects: trains each stage with nas-split's loop.

    Args:
        train: :class:`nas_split.training.TrainConfig` fields (``epochs`` per growth stage).
        seed_epochs: epochs of stage 0 (default ``train["epochs"]``).
        cost_model: what prices the records and energy-aware growth (:func:`nas_split.cost.cost_model`).
    """
    from .training import TrainConfig

    recipe = TrainConfig.model_validate({"progress": False, **(train or {})}).model_dump()
    return FunctionalEvaluator(train_stage, run={"dataset": dataset, "dataset_options": dataset_options or {},
                                                 "data_dir": data_dir, "train": recipe, "seed_epochs": seed_epochs,
                                                 "latency": latency, "cost_model": cost_model})


class _Stage:
    """A stage model exposed to NNI's ``list_models`` / ``export_top_models`` from the strategy's history."""

    def __init__(self, record: dict):
        self.sample = {k: record[k] for k in ("stage", "widths", "sizes", "checkpoint", "mmacs", "params",
                                              "energy_uj_est")}
        self.metric = record["default"]
        self.status = ModelStatus.Trained

    def executable_model(self) -> nn.Module:
        from .surgery import load_grown

        return load_grown(self.sample["checkpoint"])

    def __repr__(self) -> str:
        return f"Stage({self.sample['stage']}, top1={self.metric:.4f}, mmacs={self.sample['mmacs']:.3f})"


class SplittingDescent(Strategy):
    """Grow a :class:`BackboneSpace` by splitting steepest descent, one NNI model per stage.

    Args:
        method: a splitting variant (:data:`nas_split.splitting.variants.VARIANTS`: ``s2d``, ``fast``, ``s3d``,
            ``s3d-exact``, ``energy``; ``energy_aware=True`` selects with the LP for any of them) or another
            registered growth method (``vt``, ``firefly``, ``gradmax``, ``random``); each stage's trial carries
            the method's ``state_dict()`` (directions, learning-rate slices) to the next.
        rounds: growth stages after the seed stage.
        target_mmacs: stop once the model reaches this many MMACs (each round is cut there).
        checkpoint_dir: where each stage's model is saved (shared with the trials on ``ts``).
        export_max_mmacs: ``list_models`` (hence ``export_top_models``) keeps only stages at or under it.
        growth: further :class:`nas_split.config.GrowthConfig` fields (``grow_ratio``, ``eps``, ``c``, ...).
    """

    def __init__(self, method: str = "fast", rounds: int = 3, target_mmacs: float | None = None,
                 checkpoint_dir: str | Path = "nas-split-nni", export_max_mmacs: float | None = None,
                 **growth: Any):
        super().__init__()
        try:
            self.growth = GrowthConfig(method=method, rounds=rounds, target_mmacs=target_mmacs, **growth)
        except ValidationError as e:
            raise ConfigError(f"SplittingDescent: {validation_message(e)}") from None
        self.checkpoint_dir = Path(checkpoint_dir)
        self.export_max_mmacs = export_max_mmacs
        self.history: list[dict] = []
        self._metrics: dict[int, dict] = {}

    def extra_repr(self) -> str:
        return f"method={self.growth.method!r}, rounds={self.growth.rounds}, target_mmacs={self.growth.target_mmacs}"

    # -- NNI hooks -------------------------------------------------------------------------------------------------
    def _initialize(self, model_space, engine):
        engine.register_model_event_callback(ModelEventType.FinalMetric, self._on_final)
        return model_space

    def _cleanup(self) -> None:
        self.engine.unregister_model_event_callback(ModelEventType.FinalMetric, self._on_final)

    def _on_final(self, event: FinalMetricEvent) -> None:
        raw = event.metric
        if isinstance(raw, str):
            raw = json.loads(raw)
        if isinstance(raw, dict) and "stage" in raw:
            self._metrics[int(raw["stage"])] = raw

    def state_dict(self) -> dict:
        """The stage history (sizes, checkpoints, metrics): enough to resume on either engine."""
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the stage history; the next :meth:`run` continues after its last stage."""
        self.history = [dict(h) for h in state_dict.get("history", [])]

    def list_models(self, sort: bool = True, limit: int | None = None):
        """Stages from the strategy's own history (the engine forgets them on resume), best top-1 first.

        ``sample`` of each holds ``stage``, ``widths``, ``sizes``, ``checkpoint`` (loadable with
        :func:`nas_split.load_grown`) and the costs; ``export_max_mmacs`` drops the stages above it.
        """
        stages = [_Stage(h) for h in self.history
                  if self.export_max_mmacs is None or h["mmacs"] <= self.export_max_mmacs]
        if sort:
            stages.sort(key=lambda s: s.metric, reverse=True)
        yield from stages[:limit]

    def _run(self) -> None:
        space = self.model_space
        base = space.evaluator
        if not isinstance(base, FunctionalEvaluator) or base.function is not train_stage:
            raise ConfigError("SplittingDescent needs the evaluator of nas_split.nni_strategy.stage_evaluator()")
        run = base.arguments["run"]
        raw = isinstance(space, RawFormatModelSpace)
        template = space.model_space if raw else None
        spec = (template.net.nas_split_spec if raw else space.model.trace_kwargs["spec"])
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if raw and self.history:  # resume: the live network becomes the last stage's
            last = torch.load(self.history[-1]["checkpoint"], weights_only=True)
            apply_sizes(template.net, last["sizes"])
            template.net.load_state_dict(last["state_dict"])
        g = self.growth
        target = None if g.target_mmacs is None else g.target_mmacs * 1e6
        for stage in range(len(self.history), g.rounds + 1):
            if stage > 0 and reached(self.history[-1], g.target_mmacs, g.budget_energy_uj):
                break
            if not self.wait_for_resource():
                break
            ckpt = str((self.checkpoint_dir / f"stage{stage}.pt").resolve())
            prev = self.history[-1] if stage else None
            round_args = {} if prev is None else {  # the engine's schedule, the previous stage's state
                "growth": g.model_dump(), "state_checkpoint": _state_path(prev["checkpoint"]),
                "max_macs": round_cap(self.history[0].get("macs", self.history[0]["mmacs"] * 1e6), target, stage,
                                      g.rounds)}
            if raw:  # the live network, grown and trained in this process
                model = RawFormatModelSpace(template, FunctionalEvaluator(train_stage, run=run, stage=stage,
                                                                          checkpoint=ckpt, **round_args))
            else:  # a trial rebuilds the previous stage from its sizes and checkpoint
                stage_space = BackboneSpace(spec, prev["sizes"] if prev else None)
                model = SimplifiedModelSpace.from_model(stage_space, FunctionalEvaluator(
                    train_stage, run=run, stage=stage, checkpoint=ckpt,
                    init_checkpoint=prev["checkpoint"] if prev else None, **round_args)).freeze({})
            model.status = ModelStatus.Frozen
            model.sample = {"stage": stage}
            self.engine.submit_models(model)
            self.engine.wait_models(model)
            metric = self._metrics.get(stage)
            if model.status != ModelStatus.Trained or metric is None:
                raise RuntimeError(f"stage {stage} failed ({model.status}); the history keeps stages "
                                   f"0..{stage - 1}")
            sizes = torch.load(ckpt, weights_only=True)["sizes"]
            self.history.append({**metric, "sizes": sizes})
            atomic_write_json(self.checkpoint_dir / "history.json", self.state_dict())
            _log.info("stage %d: top-1 %.4f, %.3f MMACs", stage, metric["default"], metric["mmacs"])


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
    from .grow_run import validate_growth

    run = evaluator.arguments["run"]
    _, x, _, _ = _environment(run, 0)
    validate_growth(strategy.growth, space.net, x)  # NotGrowableError / ConfigError name the problem


def _experiment(cfg: NniRunConfig, space: BackboneSpace, evaluator, strategy, exp_id: str | None = None):
    from nni.nas.experiment import NasExperiment, NasExperimentConfig

    config = NasExperimentConfig("sequential", "raw") if cfg.engine == "sequential" else \
        NasExperimentConfig("ts", "simplified", "local")
    config.experiment_working_directory = str(Path(cfg.out, "nni-experiments").resolve())
    config.max_trial_number = cfg.growth.rounds + 1
    if cfg.engine == "ts":
        config.trial_concurrency = 1
    return NasExperiment(space, evaluator, strategy, config, id=exp_id)


def build_experiment(cfg: NniRunConfig, exp_id: str | None = None, check: bool = True):
    """``(NasExperiment, strategy)`` for a ``nas-split nni`` configuration, checked before anything starts
    (``exp_id``: the experiment to resume or view)."""
    from .experiment import prepare

    p = prepare(cfg)
    strategy = SplittingDescent(checkpoint_dir=Path(cfg.out, "checkpoints").resolve(),
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


def compare_trial(model: nn.Module, config: dict[str, Any], threads: int = 1) -> dict:
    """The evaluator of ``compare --engine nni``: one ``nas-split run`` (``config`` = its MethodRunConfig)."""
    from .compare import run_one

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

    def forward(self, x):
        return x


class _CompareStrategy(Strategy):
    """Submits every unfinished planned run as one trial; at most ``trial_concurrency`` run at once."""

    def __init__(self, configs: list[tuple[str, dict]], threads: int):
        super().__init__()
        self.configs, self.threads = configs, threads
        self.done: dict[str, dict] = {}

    def _initialize(self, model_space, engine):
        engine.register_model_event_callback(ModelEventType.FinalMetric, self._on_final)
        return model_space

    def _on_final(self, event) -> None:
        raw = event.metric if not isinstance(event.metric, str) else json.loads(event.metric)
        self.done[raw["run_dir"]] = raw

    def _run(self) -> None:
        submitted = []
        for key, config in self.configs:
            if not self.wait_for_resource():
                break
            m = SimplifiedModelSpace.from_model(_Dummy(key), FunctionalEvaluator(compare_trial, config=config,
                                                                             threads=self.threads)) \
                .freeze({})
            m.sample = {"run": key}
            self.engine.submit_models(m)
            submitted.append(m)
        self.engine.wait_models(*submitted)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def _save_trials(port: int, path: Path) -> None:
    """The NNI manager's trial list (ids, status, start and end times, final metrics), kept after it stops."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/nni/trial-jobs", timeout=10) as r:
        trials = json.loads(r.read())
    atomic_write_json(path, [{k: t.get(k) for k in ("trialJobId", "status", "startTime", "endTime",
                                                    "finalMetricData")} for t in trials])


def run_compare_nni(cfg, runs, port: int = 8080, overwrite: bool = False, on_done=lambda r, res, s: None):
    """``nas-split compare --engine nni``: the unfinished runs as NNI trials (``trial_concurrency = cfg.jobs``)
    through the local training service, then the retrain phase (``cfg.retrain``) as a second experiment; returns
    ``(run, results)`` like :func:`nas_split.compare.run_compare`."""
    import shutil

    from nni.nas.experiment import NasExperiment, NasExperimentConfig

    from .compare import finished_result, worker_threads

    check_port(port)
    out = Path(cfg.out)
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = []
    for r in runs:
        res = finished_result(r)
        if res is not None:
            on_done(r, res, True)
        else:
            todo.append(r)
    if todo:
        config = NasExperimentConfig("ts", "simplified", "local")
        config.experiment_working_directory = str((out / "nni-experiments").resolve())
        config.trial_concurrency = cfg.jobs
        config.max_trial_number = len(todo)
        strategy = _CompareStrategy([(r.key, r.config.model_dump()) for r in todo],
                                    worker_threads(cfg.jobs, len(todo)))
        exp = NasExperiment(_Dummy(), FunctionalEvaluator(compare_trial, config={}), strategy, config)
        try:
            exp.run(port=port)
            _save_trials(port, out / "nni_trials.json")
        finally:
            exp.stop()
    pairs = []
    for r in runs:
        res = finished_result(r)
        if res is None:
            raise RuntimeError(f"trial for {r.key} did not finish; see {out / 'nni-experiments'}")
        if r in todo:
            on_done(r, res, False)
        pairs.append((r, res))
    if cfg.retrain and runs and runs[0].phase == "search":  # the retrain phase: a second experiment
        from .compare import retrain_runs

        pairs += run_compare_nni(cfg, retrain_runs(cfg, runs), port, False, on_done)
    return pairs
