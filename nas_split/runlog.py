"""Run directories: TensorBoard event files with fixed tag names plus a versioned ``results.json``.

One run directory per run (per method and seed in comparisons).  Tags are constants of :class:`Tags` so that
every method's curves overlay in TensorBoard.  ``results.json`` follows :data:`RESULTS_SCHEMA_VERSION`; its
fields are documented in docs/records.md ("results.json").
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ._io import atomic_write_json
from .distributed import is_main
from .records import RESULTS_SCHEMA_VERSION, StageRecord

__all__ = ["Tags", "RunWriter", "RESULTS_SCHEMA_VERSION"]



class Tags:
    """TensorBoard scalar tags shared by every method."""

    TOP1 = "acc/top1"                  # test top-1 accuracy (fraction) after a stage
    VAL_TOP1 = "acc/val_top1"          # validation top-1 per epoch
    TRAIN_LOSS = "loss/train"          # training loss per epoch
    VAL_LOSS = "loss/val"              # validation loss per epoch
    LR = "opt/lr"
    MMACS = "cost/mmacs"               # counted
    PARAMS = "cost/params"             # counted
    ENERGY = "cost/energy_uj_est"      # estimated (see results.json cost.energy_model)
    PRICED = "cost/priced"             # the run's cost model (see results.json cost.cost_model)
    LATENCY = "cost/latency_ms"        # measured
    PEAK_MEM = "cost/peak_activation_kb_est"
    TRAIN_SECONDS = "time/train_s"
    ANALYSIS_SECONDS = "time/analysis_s"
    LEVEL_TOP1 = "acc/level{}/top1"    # an anytime run's level k: test top-1 after a stage
    LEVEL_VAL_TOP1 = "acc/level{}/val_top1"  # ... and validation top-1 per epoch
    LEVEL_MMACS = "cost/level{}/mmacs"
    LAYERS = "arch/layers"             # conv / linear layers after a stage (depth growth adds some)
    STAGE_BLOCKS = "arch/stage{}/blocks"  # blocks of a timm MobileNet stage after a stage


class RunWriter:
    """Writes one run directory: TensorBoard events and ``results.json`` (rewritten atomically on every update).

    Args:
        run_dir: the directory (created).
        meta: top-level fields of ``results.json`` (command, config, dataset, backbone, ...).
        enabled: write files (default: in process 0 only); disabled, the writer only keeps ``results``.
    """

    def __init__(self, run_dir: str | Path, meta: dict[str, Any], resume: dict[str, Any] | None = None,
                 purge_step: int | None = None, enabled: bool | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.enabled = is_main() if enabled is None else enabled
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tb = SummaryWriter(str(self.run_dir), purge_step=purge_step) if self.enabled else _NoEvents()
        self.t0 = time.time() - (resume or {}).get("wall_seconds", 0.0)
        self.results: dict[str, Any] = resume or {"schema_version": RESULTS_SCHEMA_VERSION, **meta, "stages": [],
                                                  "final": None}
        self.results["status"] = "running"
        self.flush()

    def epoch(self, global_epoch: int, rec: dict) -> None:
        """Log one epoch record from :meth:`nas_split.training.Trainer.fit`."""
        self.tb.add_scalar(Tags.TRAIN_LOSS, rec["train_loss"], global_epoch)
        self.tb.add_scalar(Tags.LR, rec["lr"], global_epoch)
        if "val_acc" in rec:
            self.tb.add_scalar(Tags.VAL_TOP1, rec["val_acc"], global_epoch)
            self.tb.add_scalar(Tags.VAL_LOSS, rec["val_loss"], global_epoch)
        for k, acc in enumerate(rec.get("val_acc_levels", [])):
            self.tb.add_scalar(Tags.LEVEL_VAL_TOP1.format(k), acc, global_epoch)

    def stage(self, record: StageRecord) -> None:
        """Log a finished stage and add it to ``results.json``.

        Stage scalars are logged at step ``epochs_total`` (epochs trained so far), the step of the epoch curves.
        """
        s, c = record.epochs_total, record.cost
        self.tb.add_scalar(Tags.TOP1, record.test_acc, s)
        self.tb.add_scalar(Tags.MMACS, c["mmacs"], s)
        self.tb.add_scalar(Tags.PARAMS, c["params"], s)
        self.tb.add_scalar(Tags.ENERGY, c["energy_uj_est"], s)
        self.tb.add_scalar(Tags.PRICED, c["priced"], s)
        self.tb.add_scalar(Tags.PEAK_MEM, c["peak_activation_bytes"] / 1024, s)
        if c.get("latency_ms") is not None:
            self.tb.add_scalar(Tags.LATENCY, c["latency_ms"], s)
        self.tb.add_scalar(Tags.TRAIN_SECONDS, record.train_seconds, s)
        if "analysis_seconds" in record.extra:
            self.tb.add_scalar(Tags.ANALYSIS_SECONDS, record.analysis_seconds, s)
        self.tb.add_scalar(Tags.LAYERS, len(record.widths), s)
        for i, blocks in enumerate(record.extra.get("depth", {}).get("stage_depths", [])):
            self.tb.add_scalar(Tags.STAGE_BLOCKS.format(i), blocks, s)
        for lv in record.extra.get("levels", []):
            self.tb.add_scalar(Tags.LEVEL_TOP1.format(lv["level"]), lv["test_acc"], s)
            self.tb.add_scalar(Tags.LEVEL_MMACS.format(lv["level"]), lv["mmacs"], s)
        self.results["stages"].append(record.to_dict())
        self.flush()

    def finish(self, hparams: dict[str, Any]) -> dict:
        """Record the final stage as ``final`` (with the run's training MACs, decision passes included), write
        ``add_hparams`` into this run and close the writer."""
        last = self.results["stages"][-1]
        c = last["cost"]
        final = {"test_acc": last["test_acc"], "mmacs": c["mmacs"], "params": c["params"],
                 "energy_uj_est": c["energy_uj_est"], "priced": c["priced"],
                 "latency_ms": c["latency_ms"],
                 "train_macs": sum(s.get("train_macs", 0.0) + s.get("analysis_macs", 0.0)
                                   for s in self.results["stages"])}
        self.results.update(final=final, status="done", wall_seconds=time.time() - self.t0)
        hp = {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in hparams.items()}
        self.tb.add_hparams(hp, {f"hparam/{k}": v for k, v in final.items() if v is not None}, run_name=".")
        self.tb.close()
        self.flush()
        return self.results

    def fail(self, error: str) -> None:
        """Mark the run failed (the last completed stage stays recorded)."""
        self.results.update(status="failed", error=error)
        self.tb.close()
        self.flush()

    def flush(self) -> None:
        """Rewrite ``results.json`` atomically."""
        self.results["wall_seconds"] = time.time() - self.t0
        if self.enabled:
            atomic_write_json(self.run_dir / "results.json", self.results)


class _NoEvents:
    """A stand-in for ``SummaryWriter`` that writes nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
