"""``nas-split grow``: seed training, then rounds of analyze -> select -> split -> train, resumable.

The rounds are :func:`nas_split.engine.grow_rounds` with the registered splitting method of ``growth.method``:
the same loop, schedule and grow step as ``run`` / ``compare`` (``growth.target_mmacs`` is the MAC target of
the engine's schedule).

Every stage ends with an atomic checkpoint ``checkpoints/stage{k}.pt`` (:mod:`nas_split.checkpoints`: the grown
model as :func:`nas_split.save_grown` writes it, the optimizer state, the method's state and the records so far),
so a crash leaves the last completed stage loadable and ``--resume RUN_DIR`` continues after it.  Each
stage reseeds every random source from ``(seed, stage)``, so a resumed run makes the same choices as an
uninterrupted one.
"""
from __future__ import annotations

import inspect
import shutil
import sys
from pathlib import Path

from ._io import output_lock
from .checkpoints import CHECKPOINT_DIR, latest_checkpoint, restore_optimizer, resume_point, save_stage, stage_path
from .config import ConfigError, GrowRunConfig, GrowthConfig, upgrade_stored
from .cost import measure_cost
from .distributed import is_main
from .engine import check_target, grow_rounds
from .errors import DivergedError
from .experiment import Prepared, check_out_dir, prepare, run_meta
from .grower import Grower
from .methods import GrowthMethod, configure_depth, create_method, growth_methods
from .records import StageRecord
from .runlog import RunWriter
from .stages import StageRunner

__all__ = ["run_grow", "validate_growth", "resume_config", "growth_method", "RESUME_KEYS"]

#: Keys a resumed run may change (``--set`` / flags with ``--resume``): the recipe of the stages still to come.
RESUME_KEYS = ("train.lr", "train.momentum", "train.nesterov", "train.weight_decay",
               "train.schedule", "train.milestones", "train.gamma", "train.warmup_epochs", "train.label_smoothing",
               "train.progress", "latency")


def resume_config(run_dir: str | Path) -> dict:
    """The configuration a run directory was started with: from ``results.json``, or, when that is missing or
    damaged, from the newest checkpoint that holds it."""
    import json

    try:
        res = json.loads(Path(run_dir, "results.json").read_text())
        if isinstance(res, dict) and isinstance(res.get("config"), dict):
            return upgrade_stored(res["config"])
    except (OSError, ValueError):
        pass
    return upgrade_stored(resume_point(run_dir).checkpoint.config)


#: The :class:`GrowthConfig` fields a :class:`~nas_split.Grower` takes besides ``grow_ratio``: the splitting
#: variants' own options, which another growth method refuses.  Derived from the two declarations (the Grower's
#: signature and the config's fields), so an option is declared once in each and listed nowhere else.
SPLITTING_ONLY = frozenset(inspect.signature(Grower.__init__).parameters) & frozenset(GrowthConfig.model_fields) \
    - {"method", "grow_ratio"}


def growth_method(g: GrowthConfig) -> GrowthMethod:
    """The registered growth method a growth configuration describes: a splitting variant with its Grower options,
    or another growth method (``vt``, ``firefly``, ``gradmax``, ``random``) with ``grow_ratio`` and, when given,
    ``lra`` / ``variance_transfer`` / ``mup``; a field the method does not read is refused."""
    from .splitting.variants import VARIANTS

    if g.method not in VARIANTS and g.method not in growth_methods():
        raise ConfigError(f"config value growth.method={g.method!r}: not a growth method; known: "
                          f"{', '.join(growth_methods())}")
    shared = {k: getattr(g, k) for k in ("lra", "variance_transfer", "mup") if getattr(g, k) is not None}
    if g.method in VARIANTS:
        if g.mup is not None:
            raise ConfigError(f"growth.mup applies to vt, not to the splitting method {g.method!r}")
        method = create_method(g.method, grow_ratio=g.grow_ratio, **{k: getattr(g, k) for k in SPLITTING_ONLY},
                               **shared)
    else:
        other = sorted(SPLITTING_ONLY & g.model_fields_set)
        if other:
            raise ConfigError(f"growth.{other[0]} applies to the splitting methods ({', '.join(VARIANTS)}), "
                              f"not to {g.method!r}")
        try:
            method = create_method(g.method, grow_ratio=g.grow_ratio, **shared)
        except TypeError:
            raise ConfigError(f"growth method {g.method!r} does not take {' / '.join(shared)}") from None
    if g.max_blocks_per_stage != GrowthConfig.model_fields["max_blocks_per_stage"].default and not g.depth:
        raise ConfigError("growth.max_blocks_per_stage applies with growth.depth: true")
    configure_depth(method, g.max_blocks_per_stage if g.depth else 0, g.anytime is not None)
    return method


def validate_growth(g: GrowthConfig, model, example_inputs) -> None:
    """Before anything is written: the seed is growable, and under budgets the schedule can reach; a field the
    schedule would ignore is refused (a MAC budget sets how many neurons each round splits, not ``grow_ratio``)."""
    method = growth_method(g)
    method.check_growable(model, example_inputs)  # NotGrowableError names the problem
    if g.target_mmacs is not None and "grow_ratio" in g.model_fields_set:
        raise ConfigError("growth.grow_ratio has no effect with growth.target_mmacs: the MAC schedule sets how many "
                          "neurons each round splits; give one of them")
    c = measure_cost(model, example_inputs, latency=False)
    check_target("growth.target_mmacs", c.macs, g.target_mmacs, g.rounds, method.max_round_factor)
    if g.budget_energy_uj is not None and c.energy_uj >= g.budget_energy_uj:
        raise ConfigError(f"growth.budget_energy_uj={g.budget_energy_uj} is not above the seed's "
                          f"{c.energy_uj:.1f} uJ (estimate)")


def run_grow(cfg: GrowRunConfig, resume: bool = False, overwrite: bool = False,
             prepared: Prepared | None = None) -> dict:
    """Run (or resume) a growth experiment into ``cfg.out``; returns the content of ``results.json``.

    The output is locked for the whole run.  On resume, the newest checkpoint that loads and checks out is used
    (newer damaged ones are reported on stderr and rewritten as the run goes on); the recipe may differ from the
    stored one in :data:`RESUME_KEYS` (e.g. a lower learning rate after a diverged stage).
    """
    with output_lock(cfg.out):
        return _run_grow(cfg, resume, overwrite, prepared)


def _run_grow(cfg: GrowRunConfig, resume: bool, overwrite: bool, prepared: Prepared | None) -> dict:
    g = cfg.growth
    run_dir = Path(cfg.out)
    start = resume_point(run_dir) if resume else None
    if not resume:
        check_out_dir(run_dir, overwrite)
    p = prepared or prepare(cfg)
    if not resume:
        validate_growth(g, p.model, p.example_inputs)
        if overwrite and run_dir.exists() and is_main():
            shutil.rmtree(run_dir)
    method = growth_method(g)
    model, optimizer, results = p.model, None, None
    if start is not None:
        for why in start.skipped:
            print(f"nas-split: warning: {why}; resuming after stage {start.stage}", file=sys.stderr)
        ckpt, model = start.checkpoint, start.model
        optimizer = restore_optimizer(model, cfg.train, ckpt.optimizer)  # a changed recipe applies from here
        method.load_state_dict(ckpt.method_state, model, p.example_inputs)
        results = ckpt.results
        results["config"] = cfg.model_dump()
    writer = RunWriter(run_dir, run_meta("grow", cfg.model_dump(), p.data.info, backbone=cfg.backbone,
                                         method=g.method),
                       resume=results, purge_step=sum(s["epochs"] for s in results["stages"]) if results else None)
    runner = StageRunner(data=p.data, recipe=cfg.train, example_inputs=p.example_inputs, record=writer.stage,
                         epoch_hook=writer.epoch, latency=cfg.latency, cost_model=p.cost_model,
                         records=[StageRecord.from_dict(s) for s in writer.results["stages"]], anytime=g.anytime)
    try:
        grow_rounds(runner, model, method, seed_epochs=g.seed_epochs if g.seed_epochs is not None else
                    cfg.train.epochs, epochs=cfg.train.epochs, rounds=g.rounds, target_mmacs=g.target_mmacs,
                    budget_energy_uj=g.budget_energy_uj, carry_optimizer=g.carry_optimizer, optimizer=optimizer,
                    on_stage=lambda k, m, opt: save_stage(stage_path(run_dir / CHECKPOINT_DIR, k), k, m, opt,
                                                          writer.results, method.state_dict()))
        return writer.finish({"method": g.method, "dataset": cfg.dataset, "backbone": cfg.backbone,
                              "rounds": g.rounds, "grow_ratio": g.grow_ratio, "eps": g.eps, "seed": cfg.train.seed,
                              "energy_aware": g.energy_aware})
    except FloatingPointError as e:  # a diverged stage: say what was kept and how to go on
        writer.fail(f"{type(e).__name__}: {e}")
        if latest_checkpoint(run_dir) is None and is_main():
            shutil.rmtree(run_dir, ignore_errors=True)
            raise DivergedError(f"{e}; nothing was kept: lower the learning rate (--lr) and run again") from e
        raise DivergedError(f"{e}; {str(run_dir)!r} keeps the stages completed before it: continue with a lower "
                            f"learning rate, nas-split grow --resume {run_dir} --lr LR") from e
    except BaseException as e:
        writer.fail(f"{type(e).__name__}: {e}")
        raise
