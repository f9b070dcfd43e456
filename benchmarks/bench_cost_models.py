"""Energy-aware growth priced by two cost models, the analytic energy model and this machine's measured latency
table, and the predicted and measured latency of the models each one grows.

Run:  python benchmarks/bench_cost_models.py [--device cpu|cuda] [--out DIR] [--set key=value ...]

Both comparisons run ``benchmarks/configs/fashion_mnist_cost_models.yaml`` (resumable, one directory per cost
model under ``--out``).  Then, for every final model, on ``--device`` at batch 1:

* **predicted** latency: the sum over conv/linear layers of the latency table
  (:class:`nas_split.cost.LatencyTable`, cached per device), what the LP of the latency-priced run saw;
* **measured** latency: :func:`nas_split.cost.measure_latency` of the whole model, the median of ``--repeats``
  measurements taken in turn over all models (A, B, C, A, B, C, ...).

Writes ``table.md`` and ``results.json`` into ``--out`` and prints the table: per cost model, top-1, MMACs,
predicted and measured ms (mean ± std over seeds), and the paired differences latency-priced − energy-priced
with 95 % t intervals.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from nas_split._io import atomic_write_json, atomic_write_text
from nas_split.compare import CompareConfig, run_compare
from nas_split.config import load_config
from nas_split.cost import LatencyTable, measure_cost, measure_latency
from nas_split.report import paired_ci
from nas_split.surgery.export import load_grown

CONFIG = Path(__file__).parent / "configs" / "fashion_mnist_cost_models.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="default: the config's out + _<device>")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    a = ap.parse_args(argv)
    base = load_config(CompareConfig, CONFIG, a.overrides)
    out = Path(a.out or f"{base.out}_{a.device}")
    models = {"energy-priced": "horowitz-45nm", "latency-priced": f"latency-{a.device}"}
    done = {tag: run_compare(CompareConfig.model_validate({**base.model_dump(), "cost_model": spec,
                                                           "out": str(out / tag)}))
            for tag, spec in models.items()}
    table = LatencyTable(a.device)  # read after the runs: the entries they timed are in its cache
    finals: dict[str, list[dict]] = {}
    for tag, pairs in done.items():
        for run, res in pairs:
            model = load_grown(Path(run.config.out) / "model.pt").eval()
            x = torch.randn(1, *res["dataset"]["input_shape"])
            finals.setdefault(tag, []).append({
                "seed": run.seed, "top1": 100 * res["final"]["test_acc"], "mmacs": res["final"]["mmacs"],
                "widths": res["stages"][-1]["widths"], "model": model, "x": x,
                "predicted_ms": measure_cost(model, x, latency=False, cost_model=table).priced})
    device = torch.device(a.device)
    for r in (r for rs in finals.values() for r in rs):
        r["model"], r["x"], r["measured"] = r["model"].to(device), r["x"].to(device), []
    for _ in range(a.repeats):  # interleaved: drift of the machine hits every model alike
        for r in (r for rs in finals.values() for r in rs):
            r["measured"].append(measure_latency(r["model"], r["x"]))
    rows = {tag: [{k: v for k, v in r.items() if k not in ("model", "x", "measured")} |
                  {"measured_ms": statistics.median(r["measured"])} for r in rs] for tag, rs in finals.items()}
    text = _table(rows, table.label, a.device)
    atomic_write_json(out / "results.json", {"device": table.source, "cost_models": models, "runs": rows})
    atomic_write_text(out / "table.md", text)
    print(text)
    return 0


def _ms(xs: list[float], fmt: str) -> str:
    return f"{statistics.fmean(xs):{fmt}} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:{fmt}}"


def _table(rows: dict[str, list[dict]], label: str, device: str) -> str:
    lines = [f"Latency table: {label} (batch 1, {device}); mean ± std over seeds.", "",
             "| LP priced by | top-1 % | MMACs | predicted ms (table sum) | measured ms | measured / predicted | "
             "widths (seed 0) |", "|---|---|---|---|---|---|---|"]
    for tag, rs in rows.items():
        ratio = [r["measured_ms"] / r["predicted_ms"] for r in rs]
        lines.append(f"| {tag} | {_ms([r['top1'] for r in rs], '.2f')} | {_ms([r['mmacs'] for r in rs], '.3f')} | "
                     f"{_ms([r['predicted_ms'] for r in rs], '.4f')} | {_ms([r['measured_ms'] for r in rs], '.4f')} | "
                     f"{_ms(ratio, '.2f')} | {'-'.join(str(w) for w in list(rs[0]['widths'].values())[:-1])} |")
    a, b = rows["latency-priced"], rows["energy-priced"]
    lines.append("")
    for key, what in (("measured_ms", "measured ms"), ("predicted_ms", "predicted ms"), ("top1", "top-1 points")):
        ci = paired_ci([r[key] for r in a], [r[key] for r in b])
        if ci is not None:
            lines.append(f"- latency-priced − energy-priced, {what}: {ci.mean:+.4g} [{ci.low:+.4g}, {ci.high:+.4g}] "
                         f"({ci.n} seeds, 95 % t interval)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
