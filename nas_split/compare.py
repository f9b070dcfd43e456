"""``nas-split compare``: every method x seed x MAC target under one recipe, resumable, then one report.

A comparison is a list of :class:`PlannedRun` (one ``nas-split run`` each, written to
``<out>/runs/<label>/<target>mmacs/seed<k>``), plus the retraining of every found architecture
(``<out>/retrain/...``, ``retrain: true``) and the scratch curve (``<out>/curve/...``, ``scratch_curve``: uniform
widths at factors of each target, against which :mod:`nas_split.report` scores every run at the MACs it
reached).  :func:`validate_compare` refuses a configuration that cannot run
before anything trains: an unknown method or option, a backbone that does not take the dataset, a MAC target a
method cannot reach (growth: not above the seed; pruning: not below the full model).  :func:`run_compare` runs
what is not finished yet (in this process, or ``jobs`` worker processes) and :mod:`nas_split.report` writes the
table, ``results.csv``, the figures and the TensorBoard summary from the run directories.

A run directory appears only when its run completed (each run is written beside it and renamed), so killing a
comparison loses at most the runs in flight and a rerun skips the finished ones.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ._io import atomic_write_json, output_lock
from .config import ConfigError, MethodRunConfig, Protocol, RunConfig
from .distributed import broadcast_object, is_main
from .errors import DivergedError, NasSplitError, RunFileError
from .records import RunResult

__all__ = ["CURVE_LABEL", "MethodEntry", "CompareConfig", "PlannedRun", "plan_runs", "retrain_runs",
           "validate_compare", "Executor", "run_locally", "run_compare",
           "finished_result", "worker_threads", "gpus_shared", "run_one", "describe", "log"]


#: What a method label may hold: it becomes a directory name below ``<out>/runs``.
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")

#: Label of the scratch-curve runs (``phase="curve"``, below ``<out>/curve``).
CURVE_LABEL = "scratch-curve"


class MethodEntry(BaseModel):
    """One method of a comparison: a registered method under a label, with its options."""

    model_config = ConfigDict(extra="forbid")

    method: str
    label: str | None = Field(None, description="name in tables and run directories (default: method)")
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("label")
    @classmethod
    def _safe(cls, v: str | None) -> str | None:
        if v is not None and not _LABEL.fullmatch(v):
            raise ValueError("a label names a run directory: letters, digits and . _ + - only, starting with a "
                             "letter or digit, at most 64 characters")
        return v

    @property
    def name(self) -> str:
        """The label, or the method's name."""
        return self.label or self.method


class CompareConfig(RunConfig, Protocol):
    """What ``nas-split compare`` runs: methods x seeds x MAC targets on one dataset, backbone and recipe.

    ``backbone_options`` build the full-width model (pruning starts there); ``seed_options`` are merged over them
    for the thin seed of growth methods.  Every method trains ``seed_epochs + rounds x train.epochs +
    finetune_epochs`` epochs under the shared :class:`~nas_split.config.Protocol`.
    """

    methods: list[MethodEntry] = Field(
        default_factory=lambda: [MethodEntry(method=m) for m in ("fast", "s3d", "prune-l1", "firefly", "scratch")],
        description="registered names, or {method, label, options}")
    seeds: list[Annotated[int, Field(ge=0, lt=2**32)]] = Field(default_factory=lambda: [0, 1], min_length=1)
    target_mmacs: list[float] = Field(default_factory=list, description="MAC targets (empty: growth rounds only)")
    scratch_curve: list[float] = Field(
        default_factory=list, description="factors of each MAC target at which uniform-width scratch runs trace the "
        "accuracy-vs-MACs curve every run is also scored against, at its own MACs (e.g. [0.5, 0.7, 1.4, 2.0])")
    tolerance: float = Field(0.03, gt=0, description="a final MAC count further than this from its target is flagged")
    retrain: bool = Field(False, description="retrain every method's final architecture from scratch with the "
                                             "scratch recipe (search -> export -> retrain)")
    baseline: str = Field("scratch", description="label the paired differences (and their CIs) are taken to")
    snapshots: bool = Field(False, description="report every earlier stage of each growth run as a row too "
                                               "('<label> S<k>', scored against the scratch curve): the stage "
                                               "snapshots an anytime run's levels are compared with")
    jobs: int = Field(1, ge=1, description="runs at once (worker processes)")
    out: str = "runs/compare"

    @field_validator("methods", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        return [{"method": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @field_validator("target_mmacs")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(not 0 < t < float("inf") for t in v):
            raise ValueError("MAC targets must be finite and > 0")
        if len(set(v)) != len(v):
            raise ValueError("a MAC target is listed twice")
        return v

    @field_validator("scratch_curve")
    @classmethod
    def _factors(cls, v: list[float]) -> list[float]:
        if any(not 0 < f < float("inf") for f in v):
            raise ValueError("scratch-curve factors must be finite and > 0")
        return sorted(set(v))

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seed {next(s for s in v if v.count(s) > 1)} is listed twice; each seed is one run")
        return v

    @model_validator(mode="after")
    def _timing_alone(self) -> CompareConfig:
        if self.jobs > 1 and self.cost_model.startswith("latency"):
            raise ValueError(f"cost_model {self.cost_model} times layers on this machine while the runs train, and "
                             f"jobs: {self.jobs} workers would time each other: use jobs: 1, or measure the table "
                             "first and give its file as cost_model")
        return self

    def entries(self) -> list[MethodEntry]:
        """The methods as :class:`MethodEntry`, labels unique."""
        out = list(self.methods)
        names = [e.name for e in out]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"methods: label {dup[0]!r} is used twice; give each entry its own label")
        if not out:
            raise ConfigError("methods: the list is empty")
        if self.scratch_curve and CURVE_LABEL in names:
            raise ConfigError(f"methods: label {CURVE_LABEL!r} names the scratch-curve runs; choose another")
        return out


@dataclass(frozen=True)
class PlannedRun:
    """One run of a comparison: a method's search run (``phase="search"``), the retraining of its final
    architecture from scratch (``phase="retrain"``) or a point of the scratch curve (``phase="curve"``)."""

    label: str
    seed: int
    target_mmacs: float | None
    config: MethodRunConfig
    phase: str = "search"

    @property
    def key(self) -> str:
        """``label/target/seed`` (the run directory below ``<out>/runs``, ``<out>/retrain`` when retraining,
        ``<out>/curve`` for the scratch curve)."""
        t = "rounds" if self.target_mmacs is None else f"{self.target_mmacs:g}mmacs"
        return f"{self.label}/{t}/seed{self.seed}"


def plan_runs(cfg: CompareConfig) -> list[PlannedRun]:
    """Every method x target x seed, in that order, as a :class:`MethodRunConfig` each; then the scratch curve:
    ``scratch`` at every ``target x factor`` of ``scratch_curve`` (distinct MAC counts) x seed."""
    common = cfg.model_dump(include={"dataset", "dataset_options", "data_dir", "backbone", "backbone_options",
                                     "latency", "cost_model", *Protocol.model_fields})
    runs = []
    for e in cfg.entries():
        for target in cfg.target_mmacs or [None]:
            for seed in cfg.seeds:
                train = cfg.train.model_copy(update={"seed": seed, "progress": False})
                rc = MethodRunConfig(**common, train=train, method=e.method, method_options=e.options,
                                     target_mmacs=target, out="")
                run = PlannedRun(e.name, seed, target, rc)
                runs.append(PlannedRun(e.name, seed, target,
                                       rc.model_copy(update={"out": str(Path(cfg.out) / "runs" / run.key)})))
    points = sorted({float(f"{t * f:.6g}") for t in cfg.target_mmacs for f in cfg.scratch_curve})
    for target in points:
        for seed in cfg.seeds:
            train = cfg.train.model_copy(update={"seed": seed, "progress": False})
            run = PlannedRun(CURVE_LABEL, seed, target, MethodRunConfig(**common, train=train, method="scratch",
                                                                        target_mmacs=target, out=""), "curve")
            runs.append(PlannedRun(CURVE_LABEL, seed, target, run.config.model_copy(
                update={"out": str(Path(cfg.out) / "curve" / run.key)}), "curve"))
    return runs


def retrain_runs(cfg: CompareConfig, runs: list[PlannedRun]) -> list[PlannedRun]:
    """The retrain phase of ``runs`` (search runs): for each run of a method that does not train from scratch, a
    ``retrain`` run of its final model (``<run>/model.pt``) with the scratch recipe, the same seed and schedule,
    written to ``<out>/retrain/<label>/<target>/seed<k>``."""
    from .experiment import MODEL_FILE
    from .methods import trains_from_scratch

    out = []
    for run in runs:
        c = run.config
        if run.phase != "search" or trains_from_scratch(c.method, c.method_options):
            continue
        rc = c.model_copy(update={"method": "retrain",
                                  "method_options": {"architecture": str(Path(c.out) / MODEL_FILE)},
                                  "out": str(Path(cfg.out) / "retrain" / run.key)})
        out.append(PlannedRun(run.label, run.seed, run.target_mmacs, rc, phase="retrain"))
    return out


def validate_compare(cfg: CompareConfig) -> list[PlannedRun]:
    """Check the whole comparison before anything trains; returns the planned runs.

    Raises:
        ConfigError: unknown method or option, or a MAC target a method cannot reach (the message names both).
        BackboneMismatchError, UnknownDatasetError, ...: as ``nas-split run`` would.
    """
    from .experiment import method_context, prepare

    runs = plan_runs(cfg)
    prepared = prepare(runs[0].config)
    for run in runs:
        if run.seed != runs[0].seed:
            continue  # the checks do not depend on the seed
        try:
            method_context(run.config, prepared)
        except NasSplitError as e:
            where = "" if run.target_mmacs is None else f" at target {run.target_mmacs:g} MMACs"
            raise ConfigError(f"method {run.label!r}{where}: {str(e).splitlines()[0]}") from None
    return runs


def finished_result(run: PlannedRun) -> dict | None:
    """The run's ``results.json`` if it completed with this very configuration (keys added since, at their
    defaults, included), else ``None``.

    Raises:
        ConfigError: the directory holds a finished run of another configuration.
    """
    import json

    p = Path(run.config.out) / "results.json"
    if not p.is_file():
        return None
    try:
        res = json.loads(p.read_text())
    except ValueError:  # damaged: the run is redone
        return None
    if not isinstance(res, dict) or res.get("status") != "done":
        return None
    try:
        RunResult.from_dict(res)
    except RunFileError:  # valid JSON of another shape: damaged too
        return None
    try:  # read with today's defaults: a key added since the run was made, at its default, is the same run
        same = MethodRunConfig.model_validate(res.get("config")).model_dump() == run.config.model_dump()
    except ValidationError:
        same = False
    if not same:
        raise ConfigError(f"{run.config.out!r} holds a finished run of a different configuration; "
                          "use another --out or pass --overwrite")
    return res


def gpus_shared(cfg: CompareConfig) -> str | None:
    """A warning when ``jobs`` worker processes would time-slice fewer GPUs than there are workers, else ``None``.

    On one GPU, processes share the card by time-slicing: measured on an H100, six concurrent 20-epoch
    Fashion-MNIST runs were each over 3x slower than one alone.  ``jobs: 1`` (the default) runs one at a time.
    """
    import torch

    on_gpu = cfg.train.accelerator in ("cuda", "gpu") or (cfg.train.accelerator == "auto"
                                                          and torch.cuda.is_available())
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.jobs > 1 and on_gpu and cfg.jobs > max(gpus, 1):
        return (f"{cfg.jobs} worker processes will time-slice {max(gpus, 1)} GPU(s); each run is slowed by the "
                "others (jobs: 1 runs them one at a time)")
    return None


def worker_threads(jobs: int, runs: int) -> int:
    """Torch threads per run when ``jobs`` runs share the machine.

    Results are bit-reproducible for a given thread count (float reductions depend on it), so both engines of
    ``compare`` use this rule.
    """
    return max(1, (os.cpu_count() or 1) // min(jobs, max(1, runs)))


def run_one(config: dict, threads: int) -> dict:
    """Worker entry point (also used in-process): one run with ``threads`` torch threads (the caller's count is
    restored afterwards), its results."""
    from .experiment import run_method
    from .numerics import torch_threads

    try:
        with torch_threads(threads):
            return run_method(MethodRunConfig.model_validate(config), overwrite=True)
    except SystemExit as e:
        if _STOPPED:  # a terminated worker: its run cleaned up as it unwound; leave now, take no queued run
            os._exit(e.code if isinstance(e.code, int) else 1)
        raise


_STOPPED = False  # set in a comparison worker by SIGTERM (_worker_init)


#: What runs a batch of planned runs: ``executor(cfg, todo, threads, done)`` runs every run of ``todo`` (its
#: ``config`` is a :class:`MethodRunConfig` written to ``config.out``, each with ``threads`` torch threads) and
#: calls ``done(run, results)`` as each finishes.  :func:`run_locally` (this process or worker processes) is the
#: default; ``nas_split.nni.trial_executor`` runs them as NNI trials.
Executor = Callable[[CompareConfig, list[PlannedRun], int, Callable[[PlannedRun, dict], None]], None]


def run_locally(cfg: CompareConfig, todo: list[PlannedRun], threads: int,
                done: Callable[[PlannedRun, dict], None]) -> None:
    """The default :data:`Executor`: the runs one after another in this process (``jobs: 1`` or a single run), or
    in ``cfg.jobs`` worker processes."""
    if cfg.jobs == 1 or len(todo) <= 1:
        for run in todo:
            done(run, run_one(run.config.model_dump(), threads))
    else:
        _run_parallel(todo, cfg.jobs, threads, done)


def run_compare(cfg: CompareConfig, overwrite: bool = False,
                on_done: Callable[[PlannedRun, dict, bool], None] = lambda run, res, skipped: None,
                runs: list[PlannedRun] | None = None, executor: Executor = run_locally
                ) -> list[tuple[PlannedRun, dict]]:
    """Run every planned run that has not finished, then (``cfg.retrain``) the :func:`retrain_runs`; returns
    ``(run, results)`` for all of them, search runs first, in plan order.

    ``on_done(run, results, skipped)`` is called as each run finishes (or is found finished).  ``executor`` runs
    each phase's unfinished runs (:data:`Executor`).  The output is locked while it runs (a second comparison into
    it is refused).
    """
    runs = runs or validate_compare(cfg)
    with output_lock(cfg.out):
        pairs = _run_compare(cfg, overwrite, on_done, runs, executor)
        if cfg.retrain:
            pairs += _run_compare(cfg, False, on_done, retrain_runs(cfg, runs), executor)
        return pairs


def _run_compare(cfg: CompareConfig, overwrite: bool, on_done: Callable[[PlannedRun, dict, bool], None],
                 runs: list[PlannedRun], executor: Executor) -> list[tuple[PlannedRun, dict]]:
    out = Path(cfg.out)
    if is_main():  # process 0 of a multi-process comparison prepares the directory and says what is left to run
        if overwrite and out.exists():
            shutil.rmtree(out)
        if out.exists() and any(out.iterdir()) and not (out / "compare.json").is_file():
            raise ConfigError(f"output directory {str(out)!r} exists and holds no comparison; choose another "
                              "--out or pass --overwrite")
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("runs/*/*/.*.partial-*"):  # runs killed mid-way (never published)
            shutil.rmtree(stale, ignore_errors=True)
        for stale in [*out.glob("retrain/*/*/.*.partial-*"), *out.glob("curve/*/*/.*.partial-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        if runs and runs[0].phase != "retrain":
            atomic_write_json(out / "compare.json", {"config": cfg.model_dump(), "runs": [r.key for r in runs]})
    found = {r.key: finished_result(r) for r in runs} if is_main() else {}
    left = broadcast_object([k for k, res in found.items() if res is None] if is_main() else None)
    results: dict[str, dict] = {}
    todo = []
    for run in runs:
        if run.key in left:
            todo.append(run)
        else:  # the other processes read what process 0 found finished
            results[run.key] = found.get(run.key) or finished_result(run)
            on_done(run, results[run.key], True)
    def done(run: PlannedRun, res: dict) -> None:
        results[run.key] = res
        on_done(run, res, False)

    try:
        if todo:
            executor(cfg, todo, worker_threads(cfg.jobs, len(todo)), done)
    except DivergedError as e:
        cause = str(e).split("; nothing was written")[0]
        raise DivergedError(f"{cause}; the finished runs are kept, but a changed recipe is another comparison: "
                            "rerun into another --out (or with --overwrite) with a lower learning rate") from e
    return [(r, results[r.key]) for r in runs]


def _run_parallel(todo: list[PlannedRun], jobs: int, threads: int,
                  done_run: Callable[[PlannedRun, dict], None]) -> None:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init)
    pending = {pool.submit(run_one, r.config.model_dump(), threads): r for r in todo}
    try:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                run = pending.pop(fut)
                done_run(run, fut.result())
    except BaseException:
        # stop the workers too (a SIGTERM reaches this process only): each gets SIGTERM, which its initializer
        # turns into SystemExit, so it removes its partial run directory, releases its lock and exits quietly
        workers = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for w in workers:
            if w.is_alive():
                w.terminate()
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
        raise
    pool.shutdown()


def _worker_init() -> None:
    """A terminated comparison worker unwinds (cleaning up as on Ctrl-C) and exits (see :func:`_run_parallel`)."""
    import signal

    def stop(signum: int, _frame) -> None:
        global _STOPPED
        _STOPPED = True
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def describe(run: PlannedRun, res: dict, skipped: bool) -> str:
    """One line about a finished run."""
    f = res["final"]
    t = "" if run.target_mmacs is None else f" @ {run.target_mmacs:g}"
    t += {"retrain": " retrained", "curve": " (scratch curve)"}.get(run.phase, "")
    what = "skipped (finished before)" if skipped else f"{res['wall_seconds']:.0f} s"
    return (f"{run.label:>14s}{t} seed {run.seed}: top-1 {100 * f['test_acc']:.2f} %, {f['mmacs']:.3f} MMACs"
            f" | {what}")


def timestamp() -> str:
    """Local time for progress lines."""
    return time.strftime("%H:%M:%S")


def log(msg: str) -> None:
    """Progress line on stderr (from process 0 of a multi-process comparison)."""
    if is_main():
        print(f"[{timestamp()}] {msg}", file=sys.stderr, flush=True)
