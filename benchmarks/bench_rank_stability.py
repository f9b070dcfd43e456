"""How stable is the fast splitting analysis' ranking of neurons?  Fast vs fast (two random starts) and fast vs
exact, at every growth point of a PointNet growth run.

Run:  python benchmarks/bench_rank_stability.py [--seeds 0 1 2] [--rounds 3] [--seed-epochs 16] [--epochs 12]

Writes ``benchmarks/results/rank_stability/rank_stability.json`` and ``table.md``.  Runtime with the defaults
(8 seeds x 3 rounds, 16 + 3 x 12 epochs per seed): 140 to 200 s on one thread of a shared 2-core x86_64 CPU, almost all
of it training; the analyses take about 0.5 s per growth point (the run's wall time is in the JSON).

Setup: the PointNet benchmark's data and models (``benchmarks/configs/pointnet_shapes3d.yaml``: shapes3d, 64
points, noise 0.05; ``pointnet_lite`` seed ``seed_options`` over ``backbone_options``, i.e. width x0.125; its
``fast`` method's options, ``analysis_batches: 5``) and training recipe (16 seed epochs, 12 per round).  Per
seed: train the seed ``--seed-epochs``, then for round r = 1..R, at the growth point (the model right before
round r's split):

* take the first ``--batches`` batches of the stage's training loader (the batches the growth step's analysis
  starts with) as a fixed list, so every analysis below sees the same samples;
* fast analysis (``fast_spectrum`` with the Grower's defaults: 3 passes, lr 0.05, beta 3, ``v_min`` only) twice,
  initial directions from ``torch.Generator().manual_seed(a)`` and ``(b)`` (``--gen-seeds``), no warm start;
* exact analysis (``exact_spectrum``, ``eigh`` of every splitting matrix) on the same batches;
* Spearman's rho of lambda_min over all neurons of all analysed layers pooled, and the median over layers of the
  per-layer rho, fast-1 vs fast-2 and fast-1 vs exact;
* top-k overlap, k = the number of neurons the fast method splits in that round given fast-1's spectra (the
  Grower's own selection: ``grow_ratio`` 0.3 of the analysed neurons, negative lambda_min only, i.e.
  ``min(#(lambda_min < 0), floor(0.3 N))``): the k neurons of lowest lambda_min under each analysis, as the
  fraction |A & B| / k and as Jaccard |A & B| / |A | B|;
* then grow as the ``fast`` method does (``nas_split.engine.grow_step``: warm-started Grower, ``grow_ratio``
  0.3) and train ``--epochs`` with the carried optimizer.

Also recorded: how far fast's lambda_min sits above exact's (the fast estimate is a Rayleigh quotient of the same
matrix, so it can only be >= the exact lambda_min up to float error).  Mean and sample std (ddof 1) over seeds
per round.  Note: with a fixed batch list the fast analysis sees the same 5 batches in each pass; in a growth
run each pass draws the loader anew (reshuffled), which adds sampling noise not measured here.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy.stats import spearmanr

from nas_split.config import MethodRunConfig
from nas_split.engine import grow_step
from nas_split.experiment import method_context, prepare
from nas_split.grower import Grower
from nas_split.splitting.analysis import exact_spectrum, fast_spectrum

#: Keys of the compare config that a single method run takes.
RUN_KEYS = ("dataset", "dataset_options", "backbone", "backbone_options", "seed_options", "train", "latency")
METRICS = ("rho_fast_fast", "rho_fast_fast_layer_median", "rho_fast_exact", "rho_fast_exact_layer_median",
           "topk_frac_fast_fast", "topk_jaccard_fast_fast", "topk_frac_fast_exact", "topk_jaccard_fast_exact",
           "fast_minus_exact_median", "fast_below_exact_frac")


def run_config(path: str, seed: int, a: argparse.Namespace) -> MethodRunConfig:
    """The compare config's run settings for one seed, as a ``fast`` method run."""
    raw = yaml.safe_load(Path(path).read_text())
    fast = [m for m in raw.get("methods", []) if isinstance(m, dict) and m.get("method") == "fast"]
    cfg = {k: raw[k] for k in RUN_KEYS if k in raw}
    cfg["train"] = {**cfg.get("train", {}), "seed": seed, "epochs": a.epochs, "progress": False}
    cfg.update(method="fast", method_options=fast[0].get("options", {}) if fast else {}, rounds=a.rounds,
               seed_epochs=a.seed_epochs, latency=False, out="/nonexistent")
    return MethodRunConfig.model_validate(cfg)


def _rho(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def _topk(lam: dict[str, np.ndarray], k: int) -> set[tuple[str, int]]:
    keys = [(n, o) for n, v in lam.items() for o in range(len(v))]
    vals = np.concatenate(list(lam.values()))
    return {keys[i] for i in np.argsort(vals, kind="stable")[:k]}


def compare(f1: dict, f2: dict, ex: dict, k: int) -> dict:
    """The rank statistics of one growth point (``{layer: lambda_min}`` arrays of the three analyses)."""
    pooled = {name: np.concatenate(list(d.values())) for name, d in (("f1", f1), ("f2", f2), ("ex", ex))}
    out = {"rho_fast_fast": _rho(pooled["f1"], pooled["f2"]), "rho_fast_exact": _rho(pooled["f1"], pooled["ex"])}
    for key, other in (("fast_fast", f2), ("fast_exact", ex)):
        per = {n: _rho(f1[n], other[n]) for n in f1}
        out[f"rho_{key}_per_layer"] = per
        finite = [v for v in per.values() if np.isfinite(v)]
        out[f"rho_{key}_layer_median"] = float(np.median(finite)) if finite else float("nan")
        top1, top2 = _topk(f1, k), _topk(other, k)
        inter = len(top1 & top2)
        out[f"topk_frac_{key}"] = inter / k if k else float("nan")
        out[f"topk_jaccard_{key}"] = inter / len(top1 | top2) if k else float("nan")
    gap = pooled["f1"] - pooled["ex"]
    scale = np.abs(pooled["ex"]).max()
    out["fast_minus_exact_median"] = float(np.median(gap))
    out["fast_below_exact_frac"] = float(np.mean(gap < -1e-4 * scale))  # clearly below: not a Rayleigh quotient
    out["exact_lam_min_median"] = float(np.median(pooled["ex"]))
    out["per_layer"] = {n: {"exact_median": float(np.median(ex[n])),
                            "fast_minus_exact_median": float(np.median(f1[n] - ex[n])),
                            "fast_negative": int((f1[n] < 0).sum()), "exact_negative": int((ex[n] < 0).sum())}
                        for n in f1}
    out["exact_negative"] = int((pooled["ex"] < 0).sum())
    out["fast_negative"] = int((pooled["f1"] < 0).sum())
    return out


def measure(model, example_inputs, batches: list, a: argparse.Namespace) -> dict:
    """Fast twice and exact once on ``batches``; k from the Grower's selection on fast-1."""
    g = Grower(model, example_inputs, "fast", grow_ratio=a.grow_ratio, analysis_batches=len(batches))
    neurons = g.neurons()
    t0 = time.perf_counter()
    fast = [fast_spectrum(model, batches, neurons, g.loss_fn, g.beta, g.fast_passes, len(batches), g.fast_lr,
                          ("min",), {}, torch.Generator().manual_seed(s)) for s in a.gen_seeds]
    t_fast = (time.perf_counter() - t0) / len(fast)
    t0 = time.perf_counter()
    exact = exact_spectrum(model, batches, neurons, g.loss_fn, g.beta, len(batches))
    t_exact = time.perf_counter() - t0
    k = len(g.select(g.candidates(fast[0])))

    def lam(sp):
        return {n: s.lam_min.detach().double().cpu().numpy() for n, s in sp.items()}

    out = {"neurons": sum(len(s.lam_min) for s in exact.values()),
           "layers": {n: len(s.lam_min) for n, s in exact.items()}, "k": k,
           "fast_seconds": t_fast, "exact_seconds": t_exact}
    out.update(compare(lam(fast[0]), lam(fast[1]), lam(exact), k))
    return out


def run_seed(seed: int, a: argparse.Namespace) -> dict:
    cfg = run_config(a.config, seed, a)
    p = prepare(cfg)
    ctx, method = method_context(cfg, p)
    model = ctx.build_seed()
    opt = ctx.stage(model, "seed", a.seed_epochs)
    rounds = []
    for r in range(1, a.rounds + 1):
        train, _, _ = ctx.loaders(r)
        batches = list(itertools.islice(train, a.batches))
        m = measure(model, p.example_inputs, batches, a)
        extra = grow_step(ctx, model, method, r, None, opt, ctx.records[-1].macs)
        m["grown_split"] = extra["growth"]["split"]
        m["test_acc_before"] = ctx.records[-1].test_acc
        opt = ctx.stage(model, "round", a.epochs, opt, **extra)
        rounds.append({"round": r, **m})
        print(f"seed {seed} round {r}: N={m['neurons']} k={m['k']} rho ff={m['rho_fast_fast']:.3f} "
              f"fe={m['rho_fast_exact']:.3f} top-k ff={m['topk_frac_fast_fast']:.2f} "
              f"fe={m['topk_frac_fast_exact']:.2f}", flush=True)
    return {"seed": seed, "rounds": rounds, "test_acc": [rec.test_acc for rec in ctx.records],
            "mmacs": [rec.macs / 1e6 for rec in ctx.records]}


def summarize(runs: list[dict], rounds: int) -> list[dict]:
    out = []
    for r in range(rounds):
        row = {"round": r + 1}
        for key in ("neurons", "k", *METRICS):
            vals = [run["rounds"][r][key] for run in runs if np.isfinite(run["rounds"][r][key])]
            row[key] = {"mean": statistics.fmean(vals) if vals else float("nan"),
                        "std": statistics.stdev(vals) if len(vals) > 1 else float("nan"), "n": len(vals)}
        out.append(row)
    return out


def table(summary: list[dict], a: argparse.Namespace, wall: float) -> str:
    def f(d, digits=3):
        return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"

    lines = [f"Rank stability of the fast splitting analysis, PointNet (shapes3d), {len(a.seeds)} seeds "
             f"(mean ± sample std); Spearman of λ_min, pooled over all neurons / median of per-layer; top-k "
             f"overlap |A∩B|/k, k = the neurons the fast method splits that round (grow ratio {a.grow_ratio}, "
             "negative λ_min only). Same batches for all three analyses; fast without warm start.", "",
             "| round | neurons | k | ρ fast-fast pooled | ρ fast-fast per-layer median | ρ fast-exact pooled "
             "| ρ fast-exact per-layer median | top-k fast-fast | top-k fast-exact |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in summary:
        lines.append(f"| {row['round']} | {row['neurons']['mean']:.1f} | {row['k']['mean']:.1f} "
                     f"| {f(row['rho_fast_fast'])} | {f(row['rho_fast_fast_layer_median'])} "
                     f"| {f(row['rho_fast_exact'])} | {f(row['rho_fast_exact_layer_median'])} "
                     f"| {f(row['topk_frac_fast_fast'], 2)} | {f(row['topk_frac_fast_exact'], 2)} |")
    lines += ["", f"`python benchmarks/bench_rank_stability.py` ({a.seed_epochs} seed epochs, {a.epochs} per round, "
              f"{a.batches} analysis batches, fast generators {a.gen_seeds[0]} / {a.gen_seeds[1]}): {wall:.0f} s on "
              f"{torch.get_num_threads()} thread(s), {platform.machine()} CPU, torch {torch.__version__}."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="benchmarks/configs/pointnet_shapes3d.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)), help="the config's 8 seeds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed-epochs", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=12, help="training epochs after each growth")
    ap.add_argument("--batches", type=int, default=5, help="analysis batches (the config's fast analysis_batches)")
    ap.add_argument("--gen-seeds", type=int, nargs=2, default=[1, 2], help="the two fast runs' generator seeds")
    ap.add_argument("--grow-ratio", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/rank_stability")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    runs = [run_seed(s, a) for s in a.seeds]
    wall = time.perf_counter() - t0
    summary = summarize(runs, a.rounds)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(a), "machine": {"processor": platform.processor(), "machine": platform.machine(),
                                           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                                           "torch": torch.__version__, "python": platform.python_version()},
              "wall_seconds": wall, "summary": summary, "runs": runs}
    (out / "rank_stability.json").write_text(json.dumps(result, indent=1))
    md = table(summary, a, wall)
    (out / "table.md").write_text(md)
    print(md)
    print(f"wall {wall:.1f} s")


if __name__ == "__main__":
    main()
