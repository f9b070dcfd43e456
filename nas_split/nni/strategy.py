"""The strategy: :class:`SplittingDescent` submits one NNI model per growth stage, on the engine's schedule."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from nni.nas.evaluator import FunctionalEvaluator
from nni.nas.execution.event import FinalMetricEvent, ModelEventType
from nni.nas.space import ModelStatus, RawFormatModelSpace, SimplifiedModelSpace
from nni.nas.strategy import Strategy
from pydantic import ValidationError
from torch import nn

from .._io import atomic_write_json
from ..checkpoints import load_stage, stage_path
from ..config import ConfigError, GrowthConfig, validation_message
from ..engine import next_stage
from ..surgery.blocks import DEPTH_KEYS, replay_depth
from ..surgery.sizes import apply_sizes
from .evaluator import train_stage
from .space import BackboneSpace

__all__ = ["SplittingDescent"]

_log = logging.getLogger(__name__)


class _Stage:
    """A stage model exposed to NNI's ``list_models`` / ``export_top_models`` from the strategy's history."""

    def __init__(self, record: dict):
        self.sample = {k: record[k] for k in ("stage", "widths", "sizes", "checkpoint", "mmacs", "params",
                                              "energy_uj_est")}
        self.sample["depth"] = record.get("depth", {})
        self.metric = record["default"]
        self.status = ModelStatus.Trained

    def executable_model(self) -> nn.Module:
        """The stage's trained network, rebuilt from its checkpoint."""
        from ..surgery import load_grown

        return load_grown(self.sample["checkpoint"])

    def __repr__(self) -> str:
        return f"Stage({self.sample['stage']}, top1={self.metric:.4f}, mmacs={self.sample['mmacs']:.3f})"


class SplittingDescent(Strategy):
    """Grow a :class:`~nas_split.nni.space.BackboneSpace` by splitting steepest descent, one NNI model per stage.

    The stages follow the engine's schedule (:func:`nas_split.engine.next_stage`: the seed, then rounds under
    their MAC caps until ``rounds`` or the budget); each stage's evaluator (:func:`~nas_split.nni.evaluator.
    train_stage`) grows and trains, and saves a stage checkpoint (:mod:`nas_split.checkpoints`) that the next stage
    continues from (weights, optimizer state, the method's ``state_dict()``).

    Args:
        method: a splitting variant (:data:`nas_split.splitting.variants.VARIANTS`: ``s2d``, ``fast``, ``s3d``,
            ``s3d-exact``, ``energy``; ``energy_aware=True`` selects with the LP for any of them) or another
            registered growth method (``vt``, ``firefly``, ``gradmax``, ``random``).
        rounds: growth stages after the seed stage.
        target_mmacs: the MAC target of the schedule: each round is cut at its cap, and the stages stop once the
            model reaches it.
        checkpoint_dir: where each stage's checkpoint is saved (shared with the trials on ``ts``).
        export_max_mmacs: ``list_models`` (hence ``export_top_models``) keeps only stages at or under it.
        growth: further :class:`nas_split.config.GrowthConfig` fields (``grow_ratio``, ``eps``, ``c``, ...).
    """

    def __init__(self, method: str = "fast", rounds: int = 3, target_mmacs: float | None = None,
                 checkpoint_dir: str | Path = "nas-split-nni", export_max_mmacs: float | None = None,
                 **growth: Any):
        super().__init__()
        try:
            self.growth = GrowthConfig(method=method, rounds=rounds, target_mmacs=target_mmacs, **growth)
        except ValidationError as e:
            raise ConfigError(f"SplittingDescent: {validation_message(e)}") from None
        self.checkpoint_dir = Path(checkpoint_dir)
        self.export_max_mmacs = export_max_mmacs
        self.history: list[dict] = []
        self._metrics: dict[int, dict] = {}

    def extra_repr(self) -> str:
        """The method, rounds and MAC budget, as ``repr`` shows them."""
        return f"method={self.growth.method!r}, rounds={self.growth.rounds}, target_mmacs={self.growth.target_mmacs}"

    # -- NNI hooks -------------------------------------------------------------------------------------------------
    def _initialize(self, model_space, engine):
        engine.register_model_event_callback(ModelEventType.FinalMetric, self._on_final)
        return model_space

    def _cleanup(self) -> None:
        self.engine.unregister_model_event_callback(ModelEventType.FinalMetric, self._on_final)

    def _on_final(self, event: FinalMetricEvent) -> None:
        raw = event.metric
        if isinstance(raw, str):
            raw = json.loads(raw)
        if isinstance(raw, dict) and "stage" in raw:
            self._metrics[int(raw["stage"])] = raw

    def state_dict(self) -> dict:
        """The stage history (sizes, depth, checkpoints, metrics): enough to resume on either engine."""
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the stage history; the next :meth:`run` continues after its last stage."""
        self.history = [dict(h) for h in state_dict.get("history", [])]

    def list_models(self, sort: bool = True, limit: int | None = None):
        """Stages from the strategy's own history (the engine forgets them on resume), best top-1 first.

        ``sample`` of each holds ``stage``, ``widths``, ``sizes``, ``depth`` (a deepened stage's record),
        ``checkpoint`` (loadable with :func:`nas_split.load_grown`) and the costs; ``export_max_mmacs`` drops the
        stages above it.
        """
        stages = [_Stage(h) for h in self.history
                  if self.export_max_mmacs is None or h["mmacs"] <= self.export_max_mmacs]
        if sort:
            stages.sort(key=lambda s: s.metric, reverse=True)
        yield from stages[:limit]

    def _run(self) -> None:
        space = self.model_space
        base = space.evaluator
        if not isinstance(base, FunctionalEvaluator) or base.function is not train_stage:
            raise ConfigError("SplittingDescent needs the evaluator of nas_split.nni.stage_evaluator()")
        run = base.arguments["run"]
        raw = isinstance(space, RawFormatModelSpace)
        template = space.model_space if raw else None
        spec = template.net.nas_split_spec if raw else space.model.trace_kwargs["spec"]
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if raw and self.history:  # resume: the live network takes the last stage's depth and sizes (weights: below)
            replay_depth(template.net, self.history[-1].get("depth", {}))
            apply_sizes(template.net, self.history[-1]["sizes"])
        g = self.growth
        while (step := next_stage(self.history, g.rounds, g.target_mmacs, g.budget_energy_uj)) is not None:
            if not self.wait_for_resource():
                break
            stage, cap = step
            prev = self.history[-1] if self.history else None
            ckpt = str(stage_path(self.checkpoint_dir, stage).resolve())
            evaluator = FunctionalEvaluator(train_stage, run=run, stage=stage, checkpoint=ckpt, growth=g.model_dump(),
                                            max_macs=cap, previous=prev["checkpoint"] if prev else None)
            if raw:  # the live network, grown and trained in this process
                model = RawFormatModelSpace(template, evaluator)
            else:  # a trial rebuilds the previous stage from its sizes (and its weights from its checkpoint)
                stage_space = BackboneSpace(spec, prev["sizes"], prev.get("depth")) if prev else BackboneSpace(spec)
                model = SimplifiedModelSpace.from_model(stage_space, evaluator).freeze({})
            model.status = ModelStatus.Frozen
            model.sample = {"stage": stage}
            self.engine.submit_models(model)
            self.engine.wait_models(model)
            metric = self._metrics.get(stage)
            if model.status != ModelStatus.Trained or metric is None:
                raise RuntimeError(f"stage {stage} failed ({model.status}); the history keeps stages "
                                   f"0..{stage - 1}")
            grown = load_stage(ckpt).model
            self.history.append({**metric, "sizes": grown["sizes"],
                                 "depth": {k: grown["spec"][k] for k in DEPTH_KEYS if k in grown["spec"]}})
            atomic_write_json(self.checkpoint_dir / "history.json", self.state_dict())
            _log.info("stage %d: top-1 %.4f, %.3f MMACs", stage, metric["default"], metric["mmacs"])
