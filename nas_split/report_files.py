"""The files of a comparison report: ``results.csv``, ``table.md``, the figures (``pareto.png``: accuracy against
MACs, the cost model's price, training MACs and wall time; ``widths.png``: every layer's width) and the TensorBoard
``summary`` run, all computed from the run directories' ``results.json`` by :mod:`nas_split.report`
(:func:`write_report`).  Figures are matplotlib PNGs, also logged with ``add_figure`` into the ``summary`` run
next to a custom-scalars layout that overlays every method's curves.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from ._io import atomic_write_text
from .report import Row, collect, cost_axis, markdown_table, summary, write_csv
from .runlog import Tags

__all__ = ["pareto_figure", "widths_figure", "write_report", "LAYOUT"]


def _colors(labels: list[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {lab: cmap(i % 10) for i, lab in enumerate(labels)}


def pareto_figure(finals: list[Row], curve: Sequence[Row] = ()):
    """Test top-1 against MMACs, the cost model's price (the axis names the model, its unit and whether it was
    measured), training MACs and wall time: mean ± std over seeds, one line per method; on the MMACs panel, hollow
    markers give the retrained accuracy (of the methods that do not train from scratch already) and a dashed grey
    line the scratch curve (its runs and the scratch runs at the targets, in order of MACs); a run's family rows
    (an anytime run's levels, a growth run's stage snapshots) take its colour, smaller markers and a dotted line
    through the family (one legend entry per family); one legend below the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(finals)
    labels = list(dict.fromkeys(lab for _, lab in s))
    family = {r.label: r.family for r in finals if r.family}  # a level's / snapshot's row -> its run's label
    colors = _colors([lab for lab in labels if lab not in family])
    colors.update({lab: colors[fam] for lab, fam in family.items()})
    fig, axes = plt.subplots(1, 4, figsize=(20, 5.2), layout="constrained")
    panels = (("mmacs", "MMACs (counted)"), ("priced", cost_axis(finals)),
              ("train_tmacs", "training TMACs (3 x forward per sample + decisions)"),
              ("seconds", "wall time of the run, s"))
    for ax, (key, xlabel) in zip(axes, panels, strict=True):
        for lab in labels:
            pts = sorted((v[key], v["top1"], v["retrained"]) for (t, lb), v in s.items() if lb == lab)
            xs, ys = [p[0][0] for p in pts], [p[1][0] for p in pts]
            member = lab in family
            ax.errorbar(xs, ys, xerr=[p[0][1] for p in pts], yerr=[p[1][1] for p in pts], marker="o", capsize=3,
                        color=colors[lab], ms=4 if member else 6, label=None if member else lab)
            if key == "mmacs" and any(p[2] is not None and p[2] != p[1] for p in pts):  # not its own retraining
                re = [(p[0][0], p[2][0]) for p in pts if p[2] is not None]
                ax.scatter([r[0] for r in re], [r[1] for r in re], facecolors="none", edgecolors=[colors[lab]],
                           s=60, label=f"{lab} (retrained)")
        for fam in dict.fromkeys(r.family for r in finals if r.family):  # an anytime run's levels: one curve
            for target in dict.fromkeys(r.target for r in finals if r.family == fam):
                members = {r.label for r in finals if r.target == target and fam in (r.label, r.family)}
                pts = sorted((s[(target, lab)][key][0], s[(target, lab)]["top1"][0]) for lab in members)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls=":", color=colors[fam], lw=1)
        if key == "mmacs" and curve:
            on = [*curve, *(r for r in finals if r.on_curve)]  # the curve runs and scratch at the targets
            pts = sorted((v["mmacs"][0], v["top1"][0]) for v in summary(on).values())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls="--", color="grey", label="scratch curve")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test top-1 %")
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 7), fontsize=8)
    return fig


def widths_figure(finals: list[Row]):
    """Output width of every conv/linear layer of the final models, one panel per target: the mean over seeds,
    or, where a method's runs differ in depth (``growth.depth``), one thinner line per run; the legend gives the
    number of layers, so a deeper network shows as a longer line."""
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
            if not rs:  # no run of this method at this target
                continue
            name = f"{lab} ({'/'.join(str(n) for n in sorted({len(r.widths) for r in rs}))} layers)"
            if all(list(r.widths) == list(rs[0].widths) for r in rs):
                layers = list(rs[0].widths)[:-1]  # the classifier's width is the number of classes
                ax.plot(range(len(layers)), [statistics.fmean(r.widths[n] for r in rs) for n in layers],
                        marker=".", color=colors[lab], label=name)
                continue
            for i, r in enumerate(rs):
                ws = list(r.widths.values())[:-1]
                ax.plot(range(len(ws)), ws, marker=".", lw=0.8, alpha=0.7, color=colors[lab],
                        label=name if i == 0 else None)
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
    "cost model's price after each stage": ["Multiline", [f"^{Tags.PRICED}$"]],
    "training and analysis seconds per stage": ["Multiline", [f"^{Tags.TRAIN_SECONDS}$",
                                                              f"^{Tags.ANALYSIS_SECONDS}$"]],
}}


def write_report(out: str | Path, pairs: Sequence[tuple], tolerance: float = 0.03,
                 baseline: str = "scratch", snapshots: bool = False) -> dict[str, Path]:
    """Write ``results.csv``, ``table.md``, ``pareto.png``, ``widths.png`` and the TensorBoard ``summary`` run.

    Returns the paths by name.
    """
    from torch.utils.tensorboard import SummaryWriter

    out = Path(out)
    rows, finals, curve = collect(pairs, snapshots)
    paths = {"csv": out / "results.csv", "table": out / "table.md", "pareto": out / "pareto.png",
             "widths": out / "widths.png", "summary": out / "summary"}
    write_csv(paths["csv"], rows)
    table = markdown_table(finals, tolerance, baseline, curve)
    atomic_write_text(paths["table"], table)
    figs = {"pareto": pareto_figure(finals, curve), "widths": widths_figure(finals)}
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
