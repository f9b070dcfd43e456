"""Contrasts of issue 24's pre-registered ablation of splitting's choice, from finished ``compare`` directories.

For each comparison directory (one protocol: ``finetune_epochs`` 0 or N), paired by seed:

==========================  =====================================  ==========================================
contrast                    arms                                   what it isolates
==========================  =====================================  ==========================================
A − B                       fast − fast-reverse                    any signal in the ranking
A − C                       fast − fast-layer-random               which neuron, given the per-layer counts
A − D                       fast − fast-random-direction           the split direction v_min
C − E                       fast-layer-random − random             the per-layer allocation
A retrained − curve         retrained fast − scratch curve         the found architecture at equal MACs
A − curve                   fast (in-run) − scratch curve          growth in-run at equal MACs
A − curve, training MACs    fast (in-run) − scratch curve          growth in-run at equal training compute
A − scratch-compute         fast (in-run) − scratch, fewer epochs  the same, where the curve does not reach
s3d − s3d-total             per-neuron − total ranking of S3D      the S3D ranking rule
bottleneck(-*) − curve      known-bad controls − scratch curve     whether the benchmark sees architecture
random-arch-k − curve       random architectures − curve           the negative control
==========================  =====================================  ==========================================

Each contrast is reported as the mean paired difference in top-1 points with its 95 % t interval, the paired
t test's p value and the Holm-adjusted p value over the whole family of one protocol (the contrasts above, top-1
and test NLL together): "holm" marks a contrast whose adjusted p is below 0.05.  Test NLL (nats) is reported
beside top-1; a lower NLL is better, so its sign is the reverse.  The curve is the seed's scratch curve
(:func:`nas_split.report.interp_log_macs`) at the MACs the run reached, or, for "equal training MACs", at the
MACs the run spent training (every stage and the decision passes; the curve's points at theirs).

``--contrasts depth`` takes issue 26's set instead (width + depth growth against width-only growth, in-run and
retrained, and against scratch at the backbone's and at the seed's depth); ``--contrasts anytime`` issue 25's (every
level of an anytime run against its seed's scratch curve at the level's MACs, OSGD against the summed losses and
the largest level alone at each level, batch-norm statistics recalibrated after training against private ones
kept while training, and the ratio of one anytime run's training MACs to those of the scratch runs at its levels'
MACs).  A run that trains from scratch is its own retraining in a retrained contrast.

Usage::

    python benchmarks/ablation.py benchmarks/results/ablation_pointnet benchmarks/results/ablation_pointnet_finetune
    python benchmarks/ablation.py --contrasts depth benchmarks/results/fashion_mnist_depth

writes ``contrasts.md``, ``contrasts.json`` and ``contrasts.png`` into each directory and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from nas_split._io import atomic_write_text
from nas_split.compare import CompareConfig, plan_runs, retrain_runs
from nas_split.records import RunResult
from nas_split.report import interp_log_macs, on_scratch_curve, paired_ci

#: (name, a, b, phase of a): ``b`` is a label, ``"curve"`` (at a's final MACs) or ``"curve-compute"`` (at a's
#: training MACs); phase ``retrain`` takes a's retrained run.
CONTRASTS = [
    ("A - B (ranking vs reversed)", "fast", "fast-reverse", "search"),
    ("A - C (neuron choice in layer)", "fast", "fast-layer-random", "search"),
    ("A - D (direction)", "fast", "fast-random-direction", "search"),
    ("C - E (allocation)", "fast-layer-random", "random", "search"),
    ("A - curve (in-run, equal MACs)", "fast", "curve", "search"),
    ("A - curve (in-run, equal training MACs)", "fast", "curve-compute", "search"),
    ("A - scratch-compute (in-run, equal training MACs)", "fast", "scratch-compute", "search"),
    ("A retrained - curve", "fast", "curve", "retrain"),
    ("A retrained - B retrained", "fast", "fast-reverse", "retrain"),
    ("C retrained - E retrained", "fast-layer-random", "random", "retrain"),
    ("s3d - s3d-total (per-neuron rank)", "s3d", "s3d-total", "search"),
    ("bottleneck - curve (known-bad control)", "bottleneck", "curve", "search"),
    ("bottleneck-global - curve (known-bad control)", "bottleneck-global", "curve", "search"),
    ("bottleneck-strong - curve (known-bad control)", "bottleneck-strong", "curve", "search"),
    ("random-arch-0 - curve", "random-arch-0", "curve", "search"),
    ("random-arch-1 - curve", "random-arch-1", "curve", "search"),
    ("random-arch-2 - curve", "random-arch-2", "curve", "search"),
]


DEPTH_CONTRASTS = [
    (f"{m}+depth - {m} ({'retrained' if ph == 'retrain' else 'in-run'})", f"{m}+depth", m, ph)
    for m in ("fast", "firefly") for ph in ("search", "retrain")] + [
    (f"{a} - {b} ({'retrained' if ph == 'retrain' else 'in-run'})", a, b, ph)
    for a in ("fast", "fast+depth", "firefly", "firefly+depth") for b in ("scratch", "scratch-seed-depth")
    for ph in ("search", "retrain")] + [
    ("scratch-seed-depth - scratch", "scratch-seed-depth", "scratch", "search")]
ANYTIME = ("anytime-osgd", "anytime-sum", "anytime-last")
ANYTIME_CONTRASTS = [(f"{a} L{k} - curve", f"{a} L{k}", "curve", "search") for a in ANYTIME for k in range(4)] + [
    (f"osgd - {b[8:]} at L{k}", f"anytime-osgd L{k}", f"{b} L{k}", "search") for b in ANYTIME[1:] for k in range(4)] + [
    (f"recalibrated - private statistics at L{k}", f"anytime-osgd-recal L{k}", f"anytime-osgd L{k}", "search")
    for k in range(4)]  # bn: recalibrate against private; L3 (the full model's own statistics) must give 0
SETS = {"ablation": CONTRASTS, "depth": DEPTH_CONTRASTS, "anytime": ANYTIME_CONTRASTS}


def load(directory: Path) -> tuple[CompareConfig, list[tuple]]:
    """The comparison's configuration and its finished ``(run, results)`` pairs."""
    cfg = CompareConfig.model_validate(json.loads((directory / "compare.json").read_text())["config"])
    cfg = cfg.model_copy(update={"out": str(directory)})
    runs = plan_runs(cfg)
    if cfg.retrain:
        runs += retrain_runs(cfg, [r for r in runs if r.phase == "search"])
    pairs = []
    for r in runs:  # read where the runs are now (a copied directory keeps its runs' original `out`)
        p = Path(r.config.out) / "results.json"
        res = json.loads(p.read_text()) if p.is_file() else None
        if res is not None and res.get("status") == "done":
            pairs.append((r, res))
    return cfg, pairs


def metrics(pairs: list[tuple]) -> tuple[dict, dict]:
    """``{(label, phase, seed): (top1 %, nll, mmacs, training MACs)}`` and the per-seed scratch curves
    ``{seed: {metric: pts}}`` (the curve runs and the scratch runs: ``top1`` / ``nll`` at the MACs they reached,
    ``top1-compute`` / ``nll-compute`` at the MACs they spent training)."""
    out, curve = {}, defaultdict(lambda: defaultdict(list))
    for run, res in pairs:
        rr = RunResult.from_dict(res)
        m = (100 * rr.last.test_acc, rr.last.test_loss, rr.last.mmacs, rr.train_macs)
        out[(run.label, run.phase, run.seed)] = m
        if run.phase == "search" and rr.from_scratch:  # its own retraining
            out[(run.label, "retrain", run.seed)] = m
        for lv in rr.last.extra.get("levels", []):  # an anytime run's levels: "<label> L<k>", the run's cost once
            out[(f"{run.label} L{lv['level']}", run.phase, run.seed)] = (100 * lv["test_acc"],
                                                                         lv.get("test_loss", math.nan),
                                                                         lv["mmacs"], rr.train_macs)
        if run.phase == "curve" or (run.phase == "search" and on_scratch_curve(res["config"])):
            for key, x in (("", m[2]), ("-compute", m[3])):
                curve[run.seed]["top1" + key].append((x, m[0]))
                curve[run.seed]["nll" + key].append((x, m[1]))
    return out, curve


def contrast(m: dict, curve: dict, a: str, b: str, phase: str, seeds: list[int]) -> dict | None:
    """Paired differences ``a − b`` over ``seeds`` for top-1 and NLL; ``None`` when fewer than two pairs."""
    d1, d2 = [], []
    for s in seeds:
        ka = (a, phase, s)
        if ka not in m:
            continue
        if b in ("curve", "curve-compute"):
            at = 3 if b == "curve-compute" else 2
            macs, key = (m[(a, "search", s)] if (a, "search", s) in m else m[ka])[at], b[5:]
            ref = (interp_log_macs(curve[s]["top1" + key], macs), interp_log_macs(curve[s]["nll" + key], macs))
            if ref[0] is None:
                continue
        else:
            kb = (b, phase, s)
            if kb not in m:
                continue
            ref = m[kb][:2]
        d1.append((m[ka][0], ref[0]))
        d2.append((m[ka][1], ref[1]))
    if len(d1) < 2:
        return None
    from scipy.stats import ttest_rel

    out = {"n": len(d1)}
    for name, d in (("top1", d1), ("nll", d2)):
        ci = paired_ci([x for x, _ in d], [y for _, y in d])
        diffs = [x - y for x, y in d]
        p = 1.0 if statistics.pstdev(diffs) == 0 else float(ttest_rel([x for x, _ in d], [y for _, y in d]).pvalue)
        out[name] = {"mean": ci.mean, "low": ci.low, "high": ci.high, "p": p}
    return out


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjusted p values (same order as ``ps``)."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adj, run = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        run = max(run, min(1.0, (len(ps) - rank) * ps[i]))
        adj[i] = run
    return adj


def training_ratios(pairs: list[tuple], labels: tuple[str, ...]) -> dict[str, list[float]]:
    """Per anytime label, per seed: the run's training MACs over those of the seed's scratch runs at its levels'
    MACs (the curve runs and the ``scratch`` run: the K networks trained one by one instead)."""
    scratch = defaultdict(float)
    for run, res in pairs:
        if run.phase == "curve" or (run.phase == "search" and on_scratch_curve(res["config"])):
            scratch[run.seed] += RunResult.from_dict(res).train_macs
    return {lab: [RunResult.from_dict(res).train_macs / scratch[run.seed] for run, res in pairs
                  if run.label == lab and run.phase == "search" and scratch[run.seed]] for lab in labels}


def analyse(directory: Path, contrasts: str = "ablation") -> tuple[dict, str]:
    """The contrasts of one comparison directory (the set ``contrasts`` of :data:`SETS`), as JSON and as a
    Markdown table."""
    cfg, pairs = load(directory)
    m, curve = metrics(pairs)
    rows = {}
    for name, a, b, phase in SETS[contrasts]:
        c = contrast(m, curve, a, b, phase, cfg.seeds)
        if c is not None:
            rows[name] = c
    keys = [(n, k) for n in rows for k in ("top1", "nll")]
    for (n, k), p in zip(keys, holm([rows[n][k]["p"] for n, k in keys]), strict=True):
        rows[n][k]["p_holm"] = p
    lines = [f"**{directory.name}**: finetune_epochs {cfg.finetune_epochs}, schedule_span {cfg.schedule_span}, "
             f"{len(cfg.seeds)} seeds, target {', '.join(f'{t:g}' for t in cfg.target_mmacs)} MMACs", "",
             "| contrast | n | Δ top-1 points [95 % CI] | p (Holm) | Δ test NLL [95 % CI] | p (Holm) |",
             "|---|---|---|---|---|---|"]
    for n, c in rows.items():
        t, ll = c["top1"], c["nll"]
        bold = "**" if t["p_holm"] < 0.05 else ""
        lines.append(f"| {n} | {c['n']} | {bold}{t['mean']:+.2f} [{t['low']:+.2f}, {t['high']:+.2f}]{bold} | "
                     f"{t['p_holm']:.3g} | {ll['mean']:+.4f} [{ll['low']:+.4f}, {ll['high']:+.4f}] | "
                     f"{ll['p_holm']:.3g} |")
    ratios = training_ratios(pairs, ANYTIME) if contrasts == "anytime" else {}
    for lab, rs in ratios.items():
        if rs:
            lines.append(f"| training MACs: {lab} / the scratch runs at its levels | {len(rs)} | "
                         f"{statistics.fmean(rs):.2f} ({min(rs):.2f}–{max(rs):.2f}) | | | |")
    lines += ["", "Paired by seed; 95 % t intervals (unadjusted); p: paired t test, Holm-adjusted over the "
              f"{len(keys)} tests of this table; bold: adjusted p < 0.05. Curve: the seed's scratch curve at the "
              "run's MACs (linear in log MACs)."]
    return {"config": {"finetune_epochs": cfg.finetune_epochs, "schedule_span": cfg.schedule_span,
                       "seeds": cfg.seeds, "target_mmacs": cfg.target_mmacs}, "contrasts": rows,
            "training_mac_ratios": ratios}, "\n".join(lines)


def figure(results: dict[str, dict], path: Path) -> None:
    """A forest plot of the top-1 contrasts, one colour per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(n for r in results.values() for n in r["contrasts"]))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.5), layout="constrained")
    for k, (proto, r) in enumerate(results.items()):
        for i, n in enumerate(names):
            c = r["contrasts"].get(n)
            if c is None:
                continue
            t = c["top1"]
            y = i + 0.2 * k
            ax.errorbar(t["mean"], y, xerr=[[t["mean"] - t["low"]], [t["high"] - t["mean"]]], fmt="o", capsize=3,
                        color=f"C{k}", label=proto if i == 0 else None)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("Δ test top-1, points (95 % CI, paired by seed)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="finished compare directories")
    ap.add_argument("--contrasts", choices=sorted(SETS), default="ablation", help="which set of contrasts")
    a = ap.parse_args()
    results = {}
    for d in a.dirs:
        res, table = analyse(d, a.contrasts)
        results[d.name] = res
        atomic_write_text(d / "contrasts.md", table + "\n")
        atomic_write_text(d / "contrasts.json", json.dumps(res, indent=1, default=lambda x: None
                                                           if isinstance(x, float) and math.isnan(x) else x))
        print(table, "\n")
    for d in a.dirs:
        figure(results, d / "contrasts.png")


if __name__ == "__main__":
    main()
