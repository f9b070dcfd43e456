"""The comparison report: ``results.csv``, a Markdown table (mean ± std over seeds, paired differences to a
baseline with t confidence intervals, in-run and retrained accuracy, training MACs), figures and TensorBoard.

Everything here is computed from the run directories' ``results.json``, so a report can be rebuilt at any time;
:mod:`nas_split.report_files` writes it (``nas_split.report_files.write_report``: the files and the figures).
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ._io import atomic_write_text
from .records import RunResult

__all__ = ["CSV_FIELDS", "Row", "PairedCI", "paired_ci", "paired_to", "interp_log_macs", "to_curve",
           "on_scratch_curve", "collect", "cost_axis", "write_csv", "summary", "markdown_table"]

#: Columns of ``results.csv`` (one row per method x seed x target x phase x stage).
CSV_FIELDS = ["label", "method", "phase", "seed", "target_mmacs", "stage", "kind", "epochs", "epochs_total",
              "test_acc", "val_acc", "mmacs", "params", "energy_uj_est", "priced", "cost_model", "latency_ms",
              "train_seconds", "analysis_seconds", "new_neurons", "train_macs", "analysis_macs", "run_seconds",
              "run_dir"]


@dataclass(frozen=True)
class Row:
    """The final stage of one search run, with the run's wall time (everything: training, analysis, surgery,
    eval), its training MACs (:attr:`~nas_split.records.RunResult.train_macs`) and the accuracy of its
    architecture retrained from scratch (``None`` when it was not retrained); or one earlier level of an anytime
    run (:mod:`nas_split.anytime_training`), with the whole run's time and training MACs (one run gives every
    level)."""

    label: str
    seed: int
    target: float | None
    test_acc: float
    mmacs: float
    priced: float
    seconds: float
    analysis_seconds: float
    epochs: int
    widths: dict[str, int]
    train_macs: float = 0.0
    retrained_acc: float | None = None
    cost_model: str = "horowitz-45nm µJ (estimated)"
    curve_acc: float | None = None
    #: a point of the scratch curve itself (a ``scratch`` run at its full epochs, beside the ``curve`` runs)
    on_curve: bool = False
    #: an anytime run's earlier level (its label is ``"<run label> L<k>"``): the level's index and the run's label
    level: int | None = None
    family: str | None = None


def interp_log_macs(points: Sequence[tuple[float, float]], macs: float) -> float | None:
    """The accuracy of a curve ``[(macs, acc), ...]`` at ``macs``, linear in ``log(macs)`` between the two
    neighbouring points (points at equal MACs are averaged); ``None`` outside the curve's range or with fewer than
    two distinct MAC counts.  E.g. points ``(1, 0.5)`` and ``(4, 0.7)`` give ``0.6`` at ``2`` MACs."""
    by: dict[float, list[float]] = defaultdict(list)
    for m, a in points:
        by[m].append(a)
    xs = sorted(by)
    if len(xs) < 2 or not xs[0] <= macs <= xs[-1]:
        return None
    for lo, hi in zip(xs, xs[1:], strict=False):
        if lo <= macs <= hi:
            t = (math.log(macs) - math.log(lo)) / (math.log(hi) - math.log(lo))
            return (1 - t) * statistics.fmean(by[lo]) + t * statistics.fmean(by[hi])
    return None


def to_curve(finals: Sequence[Row], retrained: bool = False, level: float = 0.95) -> dict[tuple, PairedCI | None]:
    """``{(target, label): CI}`` of each method's top-1 (in %, in-run or retrained) minus the scratch curve's at
    the MACs the run reached (:attr:`Row.curve_acc`, the same seed's curve): the comparison at equal final MACs,
    so a run that lands short of its target is neither penalised nor flattered.  A t interval of the per-seed
    differences (each is paired with its own seed's curve)."""
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r in finals:
        a = r.retrained_acc if retrained else r.test_acc
        groups.setdefault((r.target, r.label), [])
        if a is not None and r.curve_acc is not None:
            groups[(r.target, r.label)].append((100 * a, 100 * r.curve_acc))
    return {k: paired_ci([p[0] for p in v], [p[1] for p in v], level) for k, v in groups.items()}


def on_scratch_curve(config: dict) -> bool:
    """Whether a search run of this configuration is a point of the scratch curve: ``scratch`` with its full
    epochs (not an ``epoch_fraction`` run, which is scratch at another training budget) at the backbone's depth
    (not a ``depths`` run, another architecture family)."""
    options = config.get("method_options") or {}
    return config.get("method") == "scratch" and options.get("epoch_fraction", 1) == 1 and "depths" not in options


def collect(pairs: Sequence[tuple], snapshots: bool = False) -> tuple[list[dict], list[Row], list[Row]]:
    """``(run, results)`` pairs -> CSV rows (every stage of every run), one :class:`Row` per search run and one
    per run of the scratch curve (``phase="curve"``); an anytime run adds a row per earlier level
    (``"<label> L<k>"``), and with ``snapshots`` a growth run adds a row per earlier stage (``"<label> S<k>"``:
    the model as that stage left it, before the next growth step), each a family of the run's label.

    A search run of a method that trains from scratch (``scratch``, ``random-arch``, ``bottleneck``) is its own
    retraining; other runs take the accuracy of their ``phase="retrain"`` run when there is one.  Each search row's
    :attr:`Row.curve_acc` is its seed's scratch curve (the curve runs and the ``scratch`` runs) at its MACs
    (:func:`interp_log_macs`).
    """
    rows, finals, retrained, curve = [], [], {}, []
    for run, results in pairs:
        res = RunResult.from_dict(results)
        phase = getattr(run, "phase", "search")
        for st in res.stages:
            c = st.cost
            rows.append({"label": run.label, "method": res.meta.get("method", run.label), "phase": phase,
                         "seed": run.seed, "target_mmacs": run.target_mmacs if run.target_mmacs is not None else "",
                         "stage": st.stage, "kind": st.kind, "epochs": st.epochs,
                         "epochs_total": st.epochs_total, "test_acc": st.test_acc,
                         "val_acc": st.val_acc if st.val_acc is not None else "",
                         "mmacs": c["mmacs"], "params": c["params"], "energy_uj_est": c["energy_uj_est"],
                         "priced": _priced(c), "cost_model": cost_label(c),
                         "latency_ms": c["latency_ms"] if c.get("latency_ms") is not None else "",
                         "train_seconds": st.train_seconds, "analysis_seconds": st.analysis_seconds,
                         "new_neurons": st.extra["growth"]["new_neurons"] if "growth" in st.extra else "",
                         "train_macs": st.train_macs, "analysis_macs": st.analysis_macs,
                         "run_seconds": res.wall_seconds, "run_dir": run.config.out})
        if phase == "retrain":
            retrained[(run.label, run.target_mmacs, run.seed)] = res.last.test_acc
            continue
        last = res.last
        own = res.from_scratch and bool(res.config.get("method"))
        row = Row(run.label, run.seed, run.target_mmacs, last.test_acc, last.mmacs, _priced(last.cost),
                  res.wall_seconds, sum(s.analysis_seconds for s in res.stages), last.epochs_total, last.widths,
                  res.train_macs, last.test_acc if own else None, cost_label(last.cost))
        (curve if phase == "curve" else finals).append(row)
        if phase != "curve":
            finals += [replace(row, label=f"{run.label} L{lv['level']}", test_acc=lv["test_acc"],
                               mmacs=lv["mmacs"], priced=lv["priced"], widths=lv["widths"], level=lv["level"],
                               family=run.label) for lv in last.extra.get("levels", [])[:-1]]
            if snapshots and "levels" not in last.extra:  # an ordinary growth run: its model after each stage
                finals += [replace(row, label=f"{run.label} S{st.stage}", test_acc=st.test_acc, mmacs=st.mmacs,
                                   priced=_priced(st.cost), widths=st.widths, retrained_acc=None, level=st.stage,
                                   family=run.label, epochs=st.epochs_total,
                                   train_macs=sum(s.train_macs + s.analysis_macs for s in res.stages[:k + 1]),
                                   seconds=sum(s.train_seconds + s.analysis_seconds for s in res.stages[:k + 1]),
                                   analysis_seconds=sum(s.analysis_seconds for s in res.stages[:k + 1]))
                           for k, st in enumerate(res.stages[:-1]) if "growth" in st.extra or st.kind == "seed"]
    points: dict[int, list[tuple[float, float]]] = defaultdict(list)
    scratch = {run.label for run, res in pairs if getattr(run, "phase", "search") == "search"
               and on_scratch_curve(res.get("config") or {})}
    for r in curve + [r for r in finals if r.label in scratch]:
        points[r.seed].append((r.mmacs, r.test_acc))
    finals = [replace(r, retrained_acc=retrained.get((r.label, r.target, r.seed), r.retrained_acc),
                      curve_acc=None if r.label in scratch else interp_log_macs(points[r.seed], r.mmacs),
                      on_curve=r.label in scratch)
              for r in finals]  # scratch is a point of the curve: no difference to itself
    return rows, finals, curve


def _priced(cost: dict) -> float:
    """A stage's total under its cost model (results written before cost models: the energy estimate)."""
    return cost.get("priced", cost["energy_uj_est"])


def cost_label(cost: dict) -> str:
    """How a stage's cost was priced, e.g. ``horowitz-45nm µJ (estimated)`` or ``latency-... ms (measured)``."""
    m = cost.get("cost_model") or {"label": "horowitz-45nm", "unit": "uJ", "measured": False}
    unit = "µJ" if m["unit"] == "uJ" else m["unit"]
    return f"{m['label']} {unit} ({'measured' if m['measured'] else 'estimated'})"


def cost_axis(finals: list[Row]) -> str:
    """The name of the rows' cost axis: their cost model, unit and whether measured (several models: all named)."""
    labels = list(dict.fromkeys(r.cost_model for r in finals))
    return labels[0] if len(labels) == 1 else "cost, mixed models: " + "; ".join(labels)


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Write ``results.csv`` atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _ms(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


@dataclass(frozen=True)
class PairedCI:
    """Mean of paired differences ``a_i - b_i`` with its ``level`` confidence interval and ``n`` pairs."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0."""
        return self.low > 0 or self.high < 0


def paired_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedCI | None:
    """Confidence interval of the mean paired difference ``d_i = a_i - b_i`` (``None`` for fewer than 2 pairs).

    ``d̄ ± t_{(1+level)/2, n-1} s_d / √n`` with ``s_d`` the sample standard deviation of the differences: the
    t interval of a paired design, which removes what the pairs share (the seed's data order, split and
    initialisation) from the comparison.
    """
    from scipy.stats import t

    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    if len(d) < 2:
        return None
    m, sd = statistics.fmean(d), statistics.stdev(d)
    half = float(t.ppf((1 + level) / 2, len(d) - 1)) * sd / math.sqrt(len(d))
    return PairedCI(m, m - half, m + half, len(d))


def paired_to(finals: list[Row], baseline: str, retrained: bool = False,
              level: float = 0.95) -> dict[tuple[float | None, str], PairedCI | None]:
    """``{(target, label): CI}`` of each method's top-1 (in %, in-run or retrained) minus ``baseline``'s on the
    seeds both have (the baseline's own entry and methods without two common seeds map to ``None``)."""
    def acc(r: Row) -> float | None:
        v = r.retrained_acc if retrained else r.test_acc
        return None if v is None else 100 * v

    ref = {(r.target, r.seed): acc(r) for r in finals if r.label == baseline}
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r in finals:
        b, a = ref.get((r.target, r.seed)), acc(r)
        groups.setdefault((r.target, r.label), [])
        if r.label != baseline and a is not None and b is not None:
            groups[(r.target, r.label)].append((a, b))
    return {k: paired_ci([p[0] for p in v], [p[1] for p in v], level) for k, v in groups.items()}


def summary(finals: list[Row]) -> dict[tuple[float | None, str], dict]:
    """``{(target, label): {metric: (mean, std)}, epochs, n}`` over seeds, in first-seen order; ``retrained``
    is ``None`` for a method without retrained runs."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for r in finals:
        groups[(r.target, r.label)].append(r)
    out = {}
    for k, rs in groups.items():
        re = [100 * r.retrained_acc for r in rs if r.retrained_acc is not None]
        out[k] = {"top1": _ms([100 * r.test_acc for r in rs]), "retrained": _ms(re) if re else None,
                  "mmacs": _ms([r.mmacs for r in rs]), "priced": _ms([r.priced for r in rs]),
                  "seconds": _ms([r.seconds for r in rs]), "analysis": _ms([r.analysis_seconds for r in rs]),
                  "train_tmacs": _ms([r.train_macs / 1e12 for r in rs]), "epochs": rs[0].epochs, "n": len(rs)}
    return out


def _delta(ci: PairedCI | None) -> str:
    if ci is None:
        return "–"
    text = f"{ci.mean:+.2f} [{ci.low:+.2f}, {ci.high:+.2f}]"
    return f"**{text}**" if ci.excludes_zero else text


def markdown_table(finals: list[Row], tolerance: float = 0.03, baseline: str = "scratch",
                   curve: Sequence[Row] = ()) -> str:
    """One Markdown table per MAC target: in-run and retrained top-1 (mean ± std over seeds), each with its paired
    difference to ``baseline`` and 95 % CI (bold where the interval excludes 0) and, when the runs have a scratch
    curve, its difference to the curve at the run's own MACs (:func:`to_curve`), MACs, training MACs, the cost
    model's price (the header names the model, its unit and whether it was measured), epochs and wall time.  A
    method with runs further than ``tolerance`` from the target is marked ``† k/n`` (``k`` of its ``n`` runs);
    the ``curve`` runs get a table of their own.
    """
    s = summary(finals)
    d_run, d_re = paired_to(finals, baseline), paired_to(finals, baseline, retrained=True)
    with_curve = any(r.curve_acc is not None for r in finals)
    c_run, c_re = to_curve(finals), to_curve(finals, retrained=True)
    has_ref = any(lab == baseline for _, lab in s)
    off = defaultdict(int)
    for r in finals:
        off[(r.target, r.label)] += r.target is not None and r.level is None and abs(r.mmacs / r.target - 1) > tolerance
    out = []
    for target in dict.fromkeys(t for t, _ in s):
        rows = {lab: v for (t, lab), v in s.items() if t == target}
        title = "growth rounds only" if target is None else f"target {target:g} MMACs"
        extra = " | Δ vs scratch curve | Δ retrained vs curve" if with_curve else ""
        out += [f"**{title}** (mean ± std over seeds; wall time = the whole run: training, analysis, surgery)", "",
                f"| method | in-run top-1 % | Δ vs {baseline} | retrained top-1 % | Δ retrained vs {baseline}{extra} | "
                f"MMACs | training TMACs | {cost_axis(finals)} | epochs | wall time s | analysis s | seeds |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if with_curve else "")]
        for lab, v in rows.items():
            top = f"{v['top1'][0]:.2f} ± {v['top1'][1]:.2f}"
            re = "–" if v["retrained"] is None else f"{v['retrained'][0]:.2f} ± {v['retrained'][1]:.2f}"
            k = off[(target, lab)]
            mark = f" † {k}/{v['n']}" if k else ""
            cur = f" | {_delta(c_run.get((target, lab)))} | {_delta(c_re.get((target, lab)))}" if with_curve else ""
            out.append(f"| {lab} | {top} | {_delta(d_run.get((target, lab)))} | {re} | "
                       f"{_delta(d_re.get((target, lab)))}{cur} | {v['mmacs'][0]:.3f}{mark} | "
                       f"{v['train_tmacs'][0]:.3f} | {v['priced'][0]:.4g} | {v['epochs']} | "
                       f"{v['seconds'][0]:.0f} ± {v['seconds'][1]:.0f} | {v['analysis'][0]:.1f} | {v['n']} |")
        out.append("")
    if curve:
        out += ["**scratch curve** (uniform widths from scratch, mean ± std over seeds)", "",
                "| MMACs | top-1 % | seeds |", "|---|---|---|"]
        for (_, _), v in summary(list(curve)).items():
            out.append(f"| {v['mmacs'][0]:.3f} | {v['top1'][0]:.2f} ± {v['top1'][1]:.2f} | {v['n']} |")
        out.append("")
    if has_ref:
        out.append(f"Δ: paired difference to {baseline} on the same seeds, in points: mean [95 % CI, t distribution]; "
                   "bold where the interval excludes 0.")
    if with_curve:
        out.append("Δ vs scratch curve: the run's top-1 minus its seed's scratch curve (the curve runs and scratch, "
                   "linear in log MACs) at the MACs the run reached, in points: mean [95 % CI]; equal final MACs.")
    out.append("Retrained: the final architecture, freshly initialised, trained with the scratch recipe, epochs and "
               "seed (scratch, random-arch and bottleneck are their own retraining). Training MACs: 3 x forward MACs "
               "per training sample, summed over the run's stages, plus the growth / pruning decision passes.")
    if any(off.values()):
        out.append(f"† k/n: k of the n runs ended more than {100 * tolerance:g} % from the target.")
    return "\n".join(out).rstrip() + "\n"
