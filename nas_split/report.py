"""The comparison report: ``results.csv``, a Markdown table (mean ± std over seeds), figures and TensorBoard.

Everything here is computed from the run directories' ``results.json``, so a report can be rebuilt at any time
(:func:`write_report`).  Figures are matplotlib PNGs, also logged with ``add_figure`` into the ``summary`` run
next to a custom-scalars layout that overlays every method's curves.
"""
from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ._io import atomic_write_text
from .records import RunResult
from .runlog import Tags

__all__ = ["CSV_FIELDS", "Row", "collect", "write_csv", "summary", "markdown_table", "write_report",
           "pareto_figure", "widths_figure"]

#: Columns of ``results.csv`` (one row per method x seed x target x stage).
CSV_FIELDS = ["label", "method", "seed", "target_mmacs", "stage", "kind", "epochs", "epochs_total", "test_acc",
              "val_acc", "mmacs", "params", "energy_uj_est", "latency_ms", "train_seconds", "analysis_seconds",
              "new_neurons", "run_seconds", "run_dir"]


@dataclass(frozen=True)
class Row:
    """The final stage of one run, with the run's wall time (everything: training, analysis, surgery, eval)."""

    label: str
    seed: int
    target: float | None
    test_acc: float
    mmacs: float
    energy_uj: float
    seconds: float
    analysis_seconds: float
    epochs: int
    widths: dict[str, int]


def collect(pairs: Sequence[tuple]) -> tuple[list[dict], list[Row]]:
    """``(run, results)`` pairs -> CSV rows (every stage) and :class:`Row` finals."""
    rows, finals = [], []
    for run, results in pairs:
        res = RunResult.from_dict(results)
        for st in res.stages:
            c = st.cost
            rows.append({"label": run.label, "method": res.meta.get("method", run.label), "seed": run.seed,
                         "target_mmacs": run.target_mmacs if run.target_mmacs is not None else "",
                         "stage": st.stage, "kind": st.kind, "epochs": st.epochs,
                         "epochs_total": st.epochs_total, "test_acc": st.test_acc,
                         "val_acc": st.val_acc if st.val_acc is not None else "",
                         "mmacs": c["mmacs"], "params": c["params"], "energy_uj_est": c["energy_uj_est"],
                         "latency_ms": c["latency_ms"] if c.get("latency_ms") is not None else "",
                         "train_seconds": st.train_seconds, "analysis_seconds": st.analysis_seconds,
                         "new_neurons": st.extra["growth"]["new_neurons"] if "growth" in st.extra else "",
                         "run_seconds": res.wall_seconds, "run_dir": run.config.out})
        last = res.last
        finals.append(Row(run.label, run.seed, run.target_mmacs, last.test_acc, last.mmacs,
                          last.cost["energy_uj_est"], res.wall_seconds,
                          sum(s.analysis_seconds for s in res.stages), last.epochs_total, last.widths))
    return rows, finals


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Write ``results.csv`` atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _ms(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summary(finals: list[Row]) -> dict[tuple[float | None, str], dict[str, tuple[float, float] | int]]:
    """``{(target, label): {metric: (mean, std)}, n}`` over seeds, in first-seen order."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for r in finals:
        groups[(r.target, r.label)].append(r)
    return {k: {"top1": _ms([100 * r.test_acc for r in rs]), "mmacs": _ms([r.mmacs for r in rs]),
                "energy": _ms([r.energy_uj for r in rs]), "seconds": _ms([r.seconds for r in rs]),
                "analysis": _ms([r.analysis_seconds for r in rs]), "epochs": rs[0].epochs, "n": len(rs)}
            for k, rs in groups.items()}


def markdown_table(finals: list[Row], tolerance: float = 0.05) -> str:
    """One Markdown table per MAC target: top-1 (mean ± std over seeds), MACs, energy, epochs and wall time.

    A method whose mean MACs are further than ``tolerance`` from the target is marked ``†``; the best top-1 of
    each target is bold.
    """
    s = summary(finals)
    out = []
    for target in dict.fromkeys(t for t, _ in s):
        rows = {lab: v for (t, lab), v in s.items() if t == target}
        best = max(v["top1"][0] for v in rows.values())
        title = "growth rounds only" if target is None else f"target {target:g} MMACs"
        out += [f"**{title}** (mean ± std over seeds; wall time = the whole run: training, analysis, surgery)", "",
                "| method | test top-1 % | MMACs | energy µJ (est.) | epochs | wall time s | analysis s | seeds |",
                "|---|---|---|---|---|---|---|---|"]
        for lab, v in rows.items():
            top = f"{v['top1'][0]:.2f} ± {v['top1'][1]:.2f}"
            if v["top1"][0] == best:
                top = f"**{top}**"
            off = target is not None and abs(v["mmacs"][0] / target - 1) > tolerance
            out.append(f"| {lab} | {top} | {v['mmacs'][0]:.3f}{' †' if off else ''} | {v['energy'][0]:.1f} | "
                       f"{v['epochs']} | {v['seconds'][0]:.0f} ± {v['seconds'][1]:.0f} | {v['analysis'][0]:.1f} | "
                       f"{v['n']} |")
        out.append("")
    if any(t is not None and abs(v["mmacs"][0] / t - 1) > tolerance for (t, _), v in s.items()):
        out.append(f"† final MACs more than {100 * tolerance:g} % from the target.")
    return "\n".join(out).rstrip() + "\n"


def _colors(labels: list[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {lab: cmap(i % 10) for i, lab in enumerate(labels)}


def pareto_figure(finals: list[Row]):
    """Test top-1 against MMACs, estimated energy and wall time: mean ± std over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(finals)
    labels = list(dict.fromkeys(lab for _, lab in s))
    colors = _colors(labels)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for ax, key, xlabel in zip(axes, ("mmacs", "energy", "seconds"),
                               ("MMACs (counted)", "energy µJ (estimate, Horowitz 2014)", "wall time of the run, s"),
                               strict=True):
        for lab in labels:
            pts = sorted((v[key], v["top1"]) for (t, lb), v in s.items() if lb == lab)
            xs, ys = [p[0][0] for p in pts], [p[1][0] for p in pts]
            ax.errorbar(xs, ys, xerr=[p[0][1] for p in pts], yerr=[p[1][1] for p in pts], marker="o", capsize=3,
                        color=colors[lab], label=lab)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test top-1 %")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def widths_figure(finals: list[Row]):
    """Output width of every conv/linear layer of the final models (mean over seeds), one panel per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(r.target for r in finals))
    labels = list(dict.fromkeys(r.label for r in finals))
    colors = _colors(labels)
    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4.2), squeeze=False,
                             constrained_layout=True)
    for ax, target in zip(axes[0], targets, strict=True):
        for lab in labels:
            rs = [r for r in finals if r.target == target and r.label == lab]
            layers = list(rs[0].widths)[:-1]  # the classifier's width is the number of classes
            ax.plot(range(len(layers)), [statistics.fmean(r.widths[n] for r in rs) for n in layers], marker=".",
                    color=colors[lab], label=lab)
        ax.set_title("growth rounds only" if target is None else f"target {target:g} MMACs")
        ax.set_xlabel("layer (input to output)")
        ax.set_ylabel("output channels")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return fig


LAYOUT = {"nas-split: methods overlaid": {
    "test top-1 after each stage": ["Multiline", [f"^{Tags.TOP1}$"]],
    "validation top-1 per epoch": ["Multiline", [f"^{Tags.VAL_TOP1}$"]],
    "training loss per epoch": ["Multiline", [f"^{Tags.TRAIN_LOSS}$"]],
    "MMACs after each stage": ["Multiline", [f"^{Tags.MMACS}$"]],
    "energy estimate after each stage": ["Multiline", [f"^{Tags.ENERGY}$"]],
    "training and analysis seconds per stage": ["Multiline", [f"^{Tags.TRAIN_SECONDS}$",
                                                              f"^{Tags.ANALYSIS_SECONDS}$"]],
}}


def write_report(out: str | Path, pairs: Sequence[tuple], tolerance: float = 0.05) -> dict[str, Path]:
    """Write ``results.csv``, ``table.md``, ``pareto.png``, ``widths.png`` and the TensorBoard ``summary`` run.

    Returns the paths by name.
    """
    from torch.utils.tensorboard import SummaryWriter

    out = Path(out)
    rows, finals = collect(pairs)
    paths = {"csv": out / "results.csv", "table": out / "table.md", "pareto": out / "pareto.png",
             "widths": out / "widths.png", "summary": out / "summary"}
    write_csv(paths["csv"], rows)
    table = markdown_table(finals, tolerance)
    atomic_write_text(paths["table"], table)
    figs = {"pareto": pareto_figure(finals), "widths": widths_figure(finals)}
    import matplotlib.pyplot as plt

    for name, fig in figs.items():
        tmp = paths[name].with_name(f".{paths[name].name}.tmp.png")
        fig.savefig(tmp, dpi=110)
        tmp.replace(paths[name])
    import shutil

    shutil.rmtree(paths["summary"], ignore_errors=True)  # the summary is rebuilt from the runs every time
    tb = SummaryWriter(str(paths["summary"]))
    tb.add_custom_scalars(LAYOUT)
    tb.add_figure("pareto/top1_vs_cost", figs["pareto"], 0, close=False)
    tb.add_figure("widths/per_layer", figs["widths"], 0, close=False)
    tb.add_text("table", table, 0)
    tb.close()
    for fig in figs.values():
        plt.close(fig)
    return paths
