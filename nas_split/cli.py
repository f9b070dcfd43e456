"""``nas-split`` command line.  Bad input prints one ``nas-split: error: ...`` line and exits with code 2."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2


#: Flags of earlier versions and their names now.
_RENAMED_FLAGS = {"--budget-mmacs": "--target-mmacs", "--targets": "--target-mmacs"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        old = [f for f in _RENAMED_FLAGS if message.startswith("unrecognized arguments") and f in message.split()]
        if old:
            message += f" ({old[0]} was renamed {_RENAMED_FLAGS[old[0]]})"
        raise SystemExit(_fail(message))


def _fail(message: str) -> int:
    print(f"nas-split: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    p = _Parser(prog="nas-split", description="Grow networks by splitting steepest descent; compare with pruning.")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    _common(sub.add_parser("train", help="train a backbone on a dataset and write a run directory"))
    gr = sub.add_parser("grow", help="grow a thin seed by splitting steepest descent, round by round")
    _common(gr)
    _growth_flags(gr)
    gr.add_argument("--grow-ratio", type=float, help="new neurons per round / current neurons")
    gr.add_argument("--eps", type=float, help="split step")
    gr.add_argument("--energy-aware", action="store_true", help="select splits with the energy-aware LP")
    gr.add_argument("--resume", metavar="RUN_DIR", help="continue a run after its last completed stage")
    rn = sub.add_parser("run", help="run one method (growth or baseline) by name and write its records")
    _common(rn)
    rn.add_argument("--method", help="a registered method (see `nas-split list`)")
    _target_flag(rn, "MAC target in MMACs (pruning and scratch need one)")
    _schedule(rn)
    cp = sub.add_parser("compare", help="run methods x seeds x MAC targets and write one report")
    _common(cp)
    cp.add_argument("--methods", help="comma-separated method names (overrides the config's list)")
    cp.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    _target_flag(cp, "comma-separated MAC targets in MMACs, e.g. 3,4,6")
    _schedule(cp)
    cp.add_argument("--jobs", type=int, help="runs at once, in worker processes")
    cp.add_argument("--engine", choices=["local", "nni"], default="local",
                    help="local processes, or NNI trials through its training service (web UI)")
    cp.add_argument("--port", type=int, default=8080, help="NNI web UI port (--engine nni)")
    nn_ = sub.add_parser("nni", help="grow by splitting descent as an NNI experiment (sequential or ts engine)")
    _common(nn_)
    nn_.add_argument("--engine", choices=["sequential", "ts"], help="sequential (in-process) or ts (web UI)")
    nn_.add_argument("--port", type=int, help="NNI manager / web UI port (ts)")
    _growth_flags(nn_)
    nn_.add_argument("--view", metavar="EXPERIMENT_ID", help="serve a finished ts experiment's web UI again")
    rt = sub.add_parser("retrain", help="train a found architecture again from scratch (search -> export -> "
                                        "retrain)")
    rt.add_argument("source", metavar="RUN_DIR|CHECKPOINT",
                    help="a run / compare / grow run directory, a grow checkpoint or an exported NNI stage's file")
    rt.add_argument("--dataset", help="dataset (needed only when the source does not name one)")
    rt.add_argument("--epochs", type=_positive_int,
                    help="epochs (default: as many as the source model trained in all)")
    rt.add_argument("--lr", type=float, help="base learning rate (default: the source's)")
    rt.add_argument("--batch-size", type=int, help="training batch size (default: the source's)")
    rt.add_argument("--seed", type=int, help="seed of data order and initialisation (default: the source's)")
    rt.add_argument("--data-dir", help="directory of the dataset's files")
    rt.add_argument("--level", type=int, help="retrain this level of an anytime model (its widths after growth "
                    "stage LEVEL; nas_split.anytime) instead of the whole model")
    rt.add_argument("--out", help="run directory to create (default: <source>-retrain beside the source)")
    _output_flags(rt)
    sub.add_parser("list", help="list datasets, backbones and methods")
    return p


def _growth_flags(t: argparse.ArgumentParser) -> None:
    """The growth flags of ``grow`` and ``nni``."""
    from .splitting.variants import VARIANTS

    t.add_argument("--method", help=" | ".join(f"{v.name} ({v.description})" for v in VARIANTS.values()) +
                   " | or another growth method: vt, firefly, gradmax, random")
    _stage_flags(t)
    _target_flag(t, "MAC target in MMACs: the rounds follow a geometric schedule from the seed to it")


def _target_flag(t: argparse.ArgumentParser, help: str) -> None:
    """``--target-mmacs``, the MAC target of every verb that takes one (``target_mmacs`` in configs and records);
    parsed as YAML by the config, so ``compare`` reads a comma-separated list and the others one number."""
    t.add_argument("--target-mmacs", metavar="MMACS", help=help)


def _schedule(t: argparse.ArgumentParser) -> None:
    """The shared schedule flags of ``run`` and ``compare`` (the config's ``Protocol``)."""
    _stage_flags(t)
    t.add_argument("--seed-width-mult", type=float, help="width multiplier of the thin seed growth starts from")


def _stage_flags(t: argparse.ArgumentParser) -> None:
    """The stage counts of every verb that grows (``grow``, ``nni``, ``run``, ``compare``)."""
    t.add_argument("--rounds", type=int, help="growth rounds after the seed stage, --epochs each (a pruned network "
                                              "fine-tunes rounds x --epochs)")
    t.add_argument("--seed-epochs", type=int, help="epochs of the seed stage, or of the full model pruning starts "
                                                   "from (default --epochs)")


def _common(t: argparse.ArgumentParser) -> None:
    t.add_argument("--config", help="YAML file with the run's configuration (keys: docs/usage.md)")
    t.add_argument("--dataset", help="dataset name (see `nas-split list`)")
    t.add_argument("--backbone", help="backbone name (see `nas-split list`)")
    t.add_argument("--epochs", type=int, help="training epochs (per stage for grow)")
    t.add_argument("--lr", type=float, help="base learning rate")
    t.add_argument("--batch-size", type=int, help="training batch size")
    t.add_argument("--seed", type=int, help="seed of data splits, initialisation and shuffling")
    t.add_argument("--width-mult", type=float, help="backbone width multiplier")
    t.add_argument("--data-dir", help="directory of the dataset's files")
    t.add_argument("--out", help="run directory to create")
    _output_flags(t)


def _output_flags(t: argparse.ArgumentParser) -> None:
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.optimizer=adamw (repeatable)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--no-latency", action="store_true", help="skip the latency measurement")


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a retraining of 0 epochs would leave an untrained model)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _list(csv: str | None) -> str | None:
    return None if csv is None else "[" + ", ".join(x.strip() for x in csv.split(",") if x.strip()) + "]"


def _overrides(a: argparse.Namespace) -> list[str]:
    flags = {"dataset": a.dataset, "train.epochs": a.epochs, "train.lr": a.lr, "train.batch_size": a.batch_size,
             "train.seed": a.seed, "data_dir": a.data_dir, "out": a.out}
    if a.verb != "retrain":
        flags.update({"backbone": a.backbone, "backbone_options.width_mult": a.width_mult})
    if a.verb == "compare":
        flags.update({"methods": _list(a.methods), "seeds": _list(a.seeds), "target_mmacs": _list(a.target_mmacs),
                      "rounds": a.rounds, "seed_epochs": a.seed_epochs, "seed_options.width_mult": a.seed_width_mult,
                      "jobs": a.jobs})
    if a.verb == "run":
        flags.update({"method": a.method, "target_mmacs": a.target_mmacs, "rounds": a.rounds,
                      "seed_epochs": a.seed_epochs, "seed_options.width_mult": a.seed_width_mult})
    if a.verb in ("grow", "nni"):
        flags.update({"growth.method": a.method, "growth.rounds": a.rounds, "growth.seed_epochs": a.seed_epochs,
                      "growth.target_mmacs": a.target_mmacs})
    if a.verb == "nni":
        flags.update({"engine": a.engine, "port": a.port})
    if a.verb == "grow":
        flags.update({"growth.grow_ratio": a.grow_ratio, "growth.eps": a.eps,
                      "growth.energy_aware": a.energy_aware or None})
    out = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if a.no_progress:
        out.append("train.progress=false")
    if a.no_latency:
        out.append("latency=false")
    return out + list(a.set)


def _cmd_train(a: argparse.Namespace) -> int:
    from .config import RunConfig, load_config
    from .distributed import is_main, launch
    from .experiment import check_out_dir, prepare, run_train

    cfg = load_config(RunConfig, a.config, _overrides(a))
    check_out_dir(cfg.out, a.overwrite)
    prepared = prepare(cfg)
    launch(cfg.train)
    res = run_train(cfg, overwrite=a.overwrite, prepared=prepared)
    if not is_main():
        return 0
    f = res["final"]
    print(f"test top-1 {100 * f['test_acc']:.2f} % | {f['mmacs']:.3f} MMACs | {f['params'] / 1e6:.3f} M params | "
          f"{f['energy_uj_est']:.1f} uJ (estimate) | {f['latency_ms'] or float('nan'):.2f} ms (measured) | "
          f"{res['wall_seconds']:.0f} s")
    print(f"run directory: {cfg.out}  (view: tensorboard --logdir {cfg.out})")
    return 0


def _cmd_grow(a: argparse.Namespace) -> int:
    from .checkpoints import latest_checkpoint
    from .config import ConfigError, GrowRunConfig, load_config
    from .distributed import launch
    from .experiment import check_out_dir, prepare
    from .grow_run import RESUME_KEYS, resume_config, run_grow, validate_growth

    if a.resume:
        if not Path(a.resume, "results.json").is_file() and latest_checkpoint(a.resume) is None:
            raise ConfigError(f"--resume {a.resume!r}: no results.json there, nor checkpoints")
        changed = [o for o in _overrides(a) if o.partition("=")[0].strip() not in RESUME_KEYS]
        if changed or a.config:
            raise ConfigError(f"--resume continues with the run's own configuration; of the options only "
                              f"{', '.join(RESUME_KEYS)} may change (got {(changed or ['--config'])[0]!r})")
        base = {**resume_config(a.resume), "out": str(Path(a.resume))}  # the directory given, wherever we are
        cfg = load_config(GrowRunConfig, None, _overrides(a), base=base)
    else:
        cfg = load_config(GrowRunConfig, a.config, _overrides(a))
        check_out_dir(cfg.out, a.overwrite)
    prepared = prepare(cfg)
    if not a.resume:
        validate_growth(cfg.growth, prepared.model, prepared.example_inputs)
    launch(cfg.train)
    _print_stages(run_grow(cfg, resume=bool(a.resume), overwrite=a.overwrite, prepared=prepared), cfg.out)
    return 0


def _print_stages(results: dict, out: str) -> None:
    from .distributed import is_main
    from .records import RunResult

    if not is_main():  # one table from a multi-process run
        return

    print(f"{'stage':>5} {'kind':>9} {'test top-1':>10} {'MMACs':>9} {'params':>9} {'new':>5} {'analysis s':>10} "
          f"{'train s':>8}")
    for st in RunResult.from_dict(results).stages:
        print(f"{st.stage:>5} {st.kind:>9} {100 * st.test_acc:>9.2f}% {st.mmacs:>9.3f} {st.cost['params']:>9} "
              f"{st.new_neurons:>5} {st.analysis_seconds:>10.1f} {st.train_seconds:>8.1f}")
    print(f"run directory: {out}  (view: tensorboard --logdir {out})")


def _cmd_run(a: argparse.Namespace) -> int:
    from .config import MethodRunConfig, load_config
    from .distributed import launch
    from .experiment import check_out_dir, method_context, prepare, run_method

    cfg = load_config(MethodRunConfig, a.config, _overrides(a))
    check_out_dir(cfg.out, a.overwrite)
    prepared = prepare(cfg)
    method_context(cfg, prepared)  # refuses bad methods, options and targets before training
    launch(cfg.train)
    _print_stages(run_method(cfg, overwrite=a.overwrite, prepared=prepared), cfg.out)
    return 0


def _cmd_compare(a: argparse.Namespace) -> int:
    from ._io import output_lock
    from .compare import CompareConfig, validate_compare
    from .config import ConfigError, load_config
    from .distributed import launch, multi_process
    from .experiment import check_out_dir

    cfg = load_config(CompareConfig, a.config, _overrides(a))
    if a.overwrite:
        check_out_dir(cfg.out, True)
    runs = validate_compare(cfg)
    if multi_process(cfg.train) and (cfg.jobs > 1 or a.engine == "nni"):
        raise ConfigError("a multi-process recipe (train.devices / train.num_nodes) runs each run across the "
                          "processes: use jobs: 1 and the local engine")
    launch(cfg.train)
    with output_lock(cfg.out):
        return _compare(a, cfg, runs)


def _compare(a: argparse.Namespace, cfg, runs) -> int:
    from .compare import describe, gpus_shared, log
    from .distributed import is_main
    from .report_files import write_report

    curve = sum(r.phase == "curve" for r in runs)
    log(f"{len(runs)} runs ({len(cfg.entries())} methods x {len(cfg.target_mmacs) or 1} targets x "
        f"{len(cfg.seeds)} seeds{f', plus {curve} on the scratch curve' if curve else ''}) -> {cfg.out}")
    shared = gpus_shared(cfg)
    if shared:
        log(f"warning: {shared}")
    if cfg.baseline not in {e.name for e in cfg.entries()}:
        log(f"note: baseline {cfg.baseline!r} is not among the methods; the table has no paired differences")
    from .compare import run_compare, run_locally

    executor = run_locally
    if a.engine == "nni":  # the same plan, skips and retrain phase; the runs go to NNI trials
        from .nni import trial_executor

        executor = trial_executor(a.port)
    pairs = run_compare(cfg, overwrite=a.overwrite, runs=runs, on_done=lambda r, res, sk: log(describe(r, res, sk)),
                        executor=executor)
    if not is_main():
        return 0
    paths = write_report(cfg.out, pairs, cfg.tolerance, cfg.baseline, cfg.snapshots)
    print(paths["table"].read_text())
    print(f"table: {paths['table']}  csv: {paths['csv']}")
    print(f"plots: {paths['pareto']}  {paths['widths']}")
    print(f"TensorBoard: tensorboard --logdir {cfg.out}")
    return 0


def _cmd_nni(a: argparse.Namespace) -> int:
    import shutil

    from ._io import output_lock
    from .config import NniRunConfig, load_config
    from .experiment import check_out_dir

    cfg = load_config(NniRunConfig, a.config, _overrides(a))
    if not a.view:
        check_out_dir(cfg.out, a.overwrite)
    from .nni import build_experiment, check_port

    if a.view:
        check_port(cfg.port)
        exp, _ = build_experiment(cfg, exp_id=a.view, check=False)
        print(f"web UI of {a.view}: http://localhost:{cfg.port}  (Ctrl-C to stop)")
        exp.view(cfg.port)
        return 0
    with output_lock(cfg.out):
        if a.overwrite and Path(cfg.out).exists():
            shutil.rmtree(cfg.out)
        return _nni(cfg)


def _nni(cfg) -> int:
    from .nni import build_experiment

    exp, strategy = build_experiment(cfg)
    if cfg.engine == "ts":
        print(f"web UI: http://localhost:{cfg.port}  (experiment {exp.id})", flush=True)
    try:
        exp.run(port=cfg.port)
    finally:
        exp.stop()
    print(f"{'stage':>5} {'test top-1':>10} {'MMACs':>9} {'params':>9} {'energy uJ est':>13} {'new':>5}  widths")
    for h in strategy.history:
        print(f"{h['stage']:>5} {100 * h['default']:>9.2f}% {h['mmacs']:>9.3f} {h['params']:>9} "
              f"{h['energy_uj_est']:>13.1f} {h['new_neurons']:>5}  {h['widths']}")
    best = next(strategy.list_models(limit=1))
    print(f"best stage {best.sample['stage']}: {best.sample['checkpoint']}  (nas_split.load_grown)")
    print(f"experiment {exp.id} in {Path(cfg.out, 'nni-experiments')}")
    if cfg.engine == "ts":
        print(f"view its web UI again: the same nas-split nni options plus --view {exp.id}")
    return 0


def _cmd_retrain(a: argparse.Namespace) -> int:
    from .experiment import check_out_dir, method_context, prepare, run_method
    from .retrain import retrain_config

    cfg = retrain_config(a.source, _overrides(a), level=a.level)
    check_out_dir(cfg.out, a.overwrite)
    prepared = prepare(cfg)
    method_context(cfg, prepared)  # the architecture must take the dataset's samples
    _print_stages(run_method(cfg, overwrite=a.overwrite, prepared=prepared), cfg.out)
    return 0


def _cmd_list(a: argparse.Namespace) -> int:
    import search_spaces

    from .data import dataset_info, list_datasets

    print("datasets:")
    for n in list_datasets():
        print(f"  {n:24s} {dataset_info(n)}")
    print("backbones:")
    for n in search_spaces.list():
        s = search_spaces.info(n)
        print(f"  {n:24s} [{s.input_kind}] {s.description}")
    from .methods import list_methods

    print("methods:", ", ".join(list_methods()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nas-split`` console script."""
    args = build_parser().parse_args(argv)
    import search_spaces

    from ._io import interrupt_on_termination
    from .errors import NasSplitError

    try:
        with interrupt_on_termination():  # SIGTERM / SIGHUP end a command as Ctrl-C does
            return {"train": _cmd_train, "grow": _cmd_grow, "run": _cmd_run, "compare": _cmd_compare,
                    "nni": _cmd_nni, "retrain": _cmd_retrain, "list": _cmd_list}[args.verb](args)
    except (NasSplitError, search_spaces.UnknownSpaceError) as e:  # anything else is a bug: traceback, exit 1
        return _fail((str(e).strip().splitlines() or [type(e).__name__])[0])
    except KeyboardInterrupt:
        return _fail("interrupted")



if __name__ == "__main__":
    sys.exit(main())
