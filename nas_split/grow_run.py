"""``nas-split grow``: seed training, then rounds of analyze -> select -> split -> train, resumable.

Every stage ends with an atomic checkpoint ``checkpoints/stage{k}.pt`` (the grown model as
:func:`nas_split.save_grown` writes it, the optimizer state, the fast method's directions and the records so
far), so a crash leaves the last completed stage loadable and ``--resume RUN_DIR`` continues after it.  Each
stage reseeds every random source from ``(seed, stage)``, so a resumed run makes the same choices as an
uninterrupted one.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ._io import atomic_torch_save
from .config import ConfigError, GrowRunConfig, GrowthConfig
from .cost import measure_cost
from .experiment import Prepared, check_out_dir, prepare
from .grower import Grower
from .runlog import RunWriter
from .splitting.analysis import Spectrum
from .stages import StageRunner, stage_seed
from .surgery.export import build_grown, grown_payload
from .training import make_optimizer

__all__ = ["run_grow", "validate_growth", "latest_checkpoint", "make_grower"]


def latest_checkpoint(run_dir: str | Path) -> tuple[int, Path] | None:
    """The last completed stage of a run directory and its checkpoint, if any."""
    found = [(int(p.stem[5:]), p) for p in Path(run_dir, "checkpoints").glob("stage*.pt") if p.stem[5:].isdigit()]
    return max(found) if found else None


def make_grower(g: GrowthConfig, model, example_inputs, optimizer, seed: int,
                max_macs: float | None = None) -> Grower:
    """The :class:`Grower` a growth configuration describes (selection cut at ``max_macs`` when given)."""
    return Grower(model, example_inputs, g.method, grow_ratio=g.grow_ratio, eps=g.eps, c=g.c,
                  max_copies=g.max_copies, only_negative=g.only_negative, energy_aware=g.energy_aware, cost=g.cost,
                  max_width=g.max_width, round_to=g.round_to, optimizer=optimizer, beta=g.beta,
                  analysis_batches=g.analysis_batches, fast_passes=g.fast_passes, fast_lr=g.fast_lr, seed=seed,
                  max_macs=max_macs)


def validate_growth(cfg: GrowRunConfig, p: Prepared) -> None:
    """Before anything is written: the seed must be growable and below the MACs / energy budget."""
    make_grower(cfg.growth, p.model, p.example_inputs, None, 0)  # NotGrowableError / ValueError name the problem
    g = cfg.growth
    if g.budget_mmacs is None and g.budget_energy_uj is None:
        return
    c = measure_cost(p.model, p.example_inputs, latency=False)
    if g.budget_mmacs is not None and c.mmacs >= g.budget_mmacs:
        raise ConfigError(f"growth.budget_mmacs={g.budget_mmacs} is not above the seed's {c.mmacs:.3f} MMACs")
    if g.budget_energy_uj is not None and c.energy_uj >= g.budget_energy_uj:
        raise ConfigError(f"growth.budget_energy_uj={g.budget_energy_uj} is not above the seed's "
                          f"{c.energy_uj:.1f} uJ (estimate)")


def _save(run_dir: Path, stage: int, model, optimizer, spectra: dict[str, Spectrum], results: dict) -> None:
    payload = {"stage": stage, "model": grown_payload(model),
               "optimizer": optimizer.state_dict() if optimizer is not None else None,
               "spectra": {k: vars(v) for k, v in spectra.items()}, "results": results}
    atomic_torch_save(run_dir / "checkpoints" / f"stage{stage}.pt", payload)


def run_grow(cfg: GrowRunConfig, resume: bool = False, overwrite: bool = False,
             prepared: Prepared | None = None) -> dict:
    """Run (or resume) a growth experiment into ``cfg.out``; returns the content of ``results.json``."""
    g = cfg.growth
    run_dir = Path(cfg.out)
    start = latest_checkpoint(run_dir) if resume else None
    if resume and start is None:
        raise ConfigError(f"nothing to resume in {str(run_dir)!r}: no checkpoints/stage*.pt")
    if not resume:
        check_out_dir(run_dir, overwrite)
    p = prepared or prepare(cfg)
    if not resume:
        validate_growth(cfg, p)
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
    info = p.data.info
    model, optimizer, previous, results, first = p.model, None, {}, None, 0
    if start is not None:
        ckpt = torch.load(start[1], weights_only=True)
        model = build_grown(ckpt["model"])
        if ckpt["optimizer"] is not None:
            optimizer = make_optimizer(model, cfg.train)
            optimizer.load_state_dict(ckpt["optimizer"])
        previous = {k: Spectrum(**v) for k, v in ckpt["spectra"].items()}
        results, first = ckpt["results"], start[0] + 1
    writer = RunWriter(run_dir, {"command": "grow", "config": cfg.model_dump(),
                                 "dataset": {"name": info.name, "kind": info.kind,
                                             "input_shape": list(info.input_shape), "num_classes": info.num_classes},
                                 "backbone": cfg.backbone, "method": g.method},
                       resume=results, purge_step=sum(s["epochs"] for s in results["stages"]) if results else None)
    runner = StageRunner(data=p.data, recipe=cfg.train, example_inputs=p.example_inputs, record=writer.stage,
                         epoch_hook=writer.epoch, latency=cfg.latency, records=list(writer.results["stages"]))
    try:
        for stage in range(first, g.rounds + 1):
            extra = {}
            if stage > 0:
                if _reached(g, measure_cost(model.cpu(), p.example_inputs, latency=False)):
                    break
                tr, _, _ = runner.loaders(stage)
                grower = make_grower(g, model, p.example_inputs, optimizer if g.carry_optimizer else None,
                                 stage_seed(cfg.train.seed, stage))
                grower.spectra = previous
                report = grower.step(tr)
                previous = grower.spectra
                extra = {"growth": report.to_dict(), "analysis_seconds": report.analysis_seconds}
                if not g.carry_optimizer:
                    optimizer = None
            epochs = (g.seed_epochs if g.seed_epochs is not None else cfg.train.epochs) if stage == 0 \
                else cfg.train.epochs
            optimizer = runner.stage(model, "seed" if stage == 0 else "round", epochs, optimizer, **extra)
            _save(run_dir, stage, model, optimizer, previous, writer.results)
        return writer.finish({"method": g.method, "dataset": cfg.dataset, "backbone": cfg.backbone,
                              "rounds": g.rounds, "grow_ratio": g.grow_ratio, "eps": g.eps, "seed": cfg.train.seed,
                              "energy_aware": g.energy_aware})
    except BaseException as e:
        writer.fail(f"{type(e).__name__}: {e}")
        raise


def _reached(g, cost) -> bool:
    return (g.budget_mmacs is not None and cost.mmacs >= g.budget_mmacs) or \
        (g.budget_energy_uj is not None and cost.energy_uj >= g.budget_energy_uj)
