"""Typed records of a run: :class:`StageRecord` (one stage) and :class:`RunResult` (a ``results.json``).

They are what the stage runner produces, the run log writes, the report and the CLI read, and the NNI adapter
reports; ``to_dict`` / ``from_dict`` keep the ``results.json`` layout of :data:`RESULTS_SCHEMA_VERSION` (the
docs/records.md), so files written before these classes existed load unchanged.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import RunFileError, first_problem

__all__ = ["RESULTS_SCHEMA_VERSION", "StageRecord", "RunResult"]

#: Version of the ``results.json`` layout; bump it when a field changes meaning or disappears.
RESULTS_SCHEMA_VERSION = 1


@dataclass
class StageRecord:
    """One trained (or pruned) stage: its accuracy, costs (``CostReport.to_dict(layers=True)``), layer widths and
    per-epoch history; ``extra`` holds what only some stages have (``growth``, ``analysis_seconds``, ``pruning``,
    ``width_mult``, ``train_samples``, ``train_macs``, ``analysis_macs``), written as top-level keys of the stage
    in ``results.json``."""

    stage: int
    kind: str
    epochs: int
    epochs_total: int
    test_acc: float
    test_loss: float
    val_acc: float | None
    train_seconds: float
    history: list[dict]
    cost: dict[str, Any]
    widths: dict[str, int]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def macs(self) -> int:
        """MACs per sample (counted)."""
        return self.cost["macs"]

    @property
    def mmacs(self) -> float:
        """Millions of MACs per sample."""
        return self.cost["mmacs"]

    @property
    def analysis_seconds(self) -> float:
        """Growth analysis time before this stage (0 for stages without growth)."""
        return self.extra.get("analysis_seconds", 0.0)

    @property
    def train_macs(self) -> float:
        """MACs spent training this stage (``3 x samples x MACs``; 0 in files written before it was recorded)."""
        return self.extra.get("train_macs", 0.0)

    @property
    def analysis_macs(self) -> float:
        """MACs of the growth / pruning decision passes before this stage (0 without)."""
        return self.extra.get("analysis_macs", 0.0)

    @property
    def new_neurons(self) -> int:
        """Neurons added by the growth before this stage (0 without growth)."""
        return (self.extra.get("growth") or {}).get("new_neurons", 0)

    def to_dict(self) -> dict[str, Any]:
        """The stage as ``results.json`` holds it."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageRecord:
        """A stage of ``results.json``."""
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: d[k] for k in names}, extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def elsewhere(cls, stage: int, epochs: int, epochs_total: int) -> StageRecord:
        """A stage trained in another process (an earlier NNI trial): only its index and epochs are known here."""
        return cls(stage, "", epochs, epochs_total, float("nan"), float("nan"), None, 0.0, [], {}, {})

    def nni_metric(self, **more: Any) -> dict[str, Any]:
        """The metric dict reported to NNI: ``default`` (test top-1), costs, and ``more``."""
        c = self.cost
        return {"default": self.test_acc, "mmacs": c["mmacs"], "macs": c["macs"], "params": c["params"],
                "energy_uj_est": c["energy_uj_est"], **more}


@dataclass
class RunResult:
    """A run directory's ``results.json``: what ran (``command``, ``config`` and the ``meta`` fields: ``dataset``,
    ``backbone``, ``method``, ``error``, ...), its stages, the ``final`` summary and wall time."""

    command: str
    status: str
    config: dict[str, Any]
    stages: list[StageRecord]
    final: dict[str, Any] | None = None
    wall_seconds: float = 0.0
    schema_version: int = RESULTS_SCHEMA_VERSION
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def train_macs(self) -> float:
        """MACs spent training the run: every stage's training plus the decision passes."""
        return sum(s.train_macs + s.analysis_macs for s in self.stages)

    @property
    def from_scratch(self) -> bool:
        """Whether the run trained its architecture from fresh weights in one stage (``scratch``, ``random-arch``,
        ``bottleneck``, ``retrain``), so that it is its own retraining: the ``from_scratch`` the run recorded; in
        files written before it was recorded, a run of one stage that is not a seed stage."""
        if "from_scratch" in self.meta:
            return bool(self.meta["from_scratch"])
        return len(self.stages) == 1 and self.stages[0].kind != "seed"

    @property
    def last(self) -> StageRecord:
        """The last recorded stage."""
        return self.stages[-1]

    def to_dict(self) -> dict[str, Any]:
        """The ``results.json`` layout."""
        return {"schema_version": self.schema_version, "command": self.command, **self.meta, "config": self.config,
                "stages": [s.to_dict() for s in self.stages], "final": self.final, "status": self.status,
                "wall_seconds": self.wall_seconds}

    @classmethod
    def from_dict(cls, d: Any, where: str = "results.json") -> RunResult:
        """Read the ``results.json`` layout, checked by :class:`_ResultsFile` first.

        Raises:
            RunFileError: ``d`` is not of that layout (``where`` and the first wrong key in one line).
        """
        try:
            _ResultsFile.model_validate(d)
        except ValidationError as e:
            key, msg, _ = first_problem(e)
            raise RunFileError(f"{where} is not a results file nas-split wrote: {key}: {msg}") from None
        known = {"schema_version", "command", "config", "stages", "final", "status", "wall_seconds"}
        return cls(d.get("command", ""), d.get("status", ""), d.get("config", {}),
                   [StageRecord.from_dict(s) for s in d.get("stages", [])], d.get("final"),
                   d.get("wall_seconds", 0.0), d.get("schema_version", RESULTS_SCHEMA_VERSION),
                   {k: v for k, v in d.items() if k not in known})

    @classmethod
    def load(cls, path: str | Path) -> RunResult:
        """Read a ``results.json`` file (:class:`RunFileError` if it is not JSON or not of the layout)."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise RunFileError(f"{str(path)!r} cannot be read as JSON ({type(e).__name__})") from None
        return cls.from_dict(d, repr(str(path)))


class _StageFile(BaseModel):
    """The keys every stage of ``results.json`` holds (others are :attr:`StageRecord.extra`)."""

    model_config = ConfigDict(extra="allow")

    stage: int
    kind: str
    epochs: int = Field(ge=0)
    epochs_total: int = Field(ge=0)
    test_acc: float
    test_loss: float
    val_acc: float | None
    train_seconds: float
    history: list[dict[str, Any]]
    cost: dict[str, Any]
    widths: dict[str, int]


class _ResultsFile(BaseModel):
    """The layout of ``results.json`` that :meth:`RunResult.from_dict` reads."""

    model_config = ConfigDict(extra="allow")

    command: str = ""
    status: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    stages: list[_StageFile] = Field(default_factory=list)
    final: dict[str, Any] | None = None
    wall_seconds: float = 0.0
    schema_version: int = RESULTS_SCHEMA_VERSION
