"""The one stage checkpoint: what every stage of a growth run leaves behind, and how it is read back.

**Layout.**  Stage ``k`` of a run is one file, ``<run>/checkpoints/stage{k}.pt`` (:func:`stage_path`), written
atomically by :func:`save_stage` and holding plain data only (``torch.load(weights_only=True)`` reads it; nothing
in it is run)::

    {"stage": k,
     "model": {...},          # the grown model, as nas_split.save_grown writes it (spec, sizes, state_dict)
     "optimizer": {...},      # its optimizer's state_dict, or None
     "results": {...},        # the run's records so far, in the results.json layout: "config" and stages 0..k
     "spectra": {...}, "stages": {...}}   # the growth method's state_dict (directions, learning-rate slices)

``nas-split grow`` writes one after every stage, and so does the NNI stage evaluator on both engines
(:mod:`nas_split.nni`); ``nas-split retrain`` and :func:`nas_split.load_grown` read the model from it.

**Older layout.**  Before this module, an NNI stage was two files: the model (a :func:`nas_split.save_grown` file)
and beside it ``stage{k}.state.pt`` holding the optimizer state, the method's state, the evaluator's ``run``
settings and ``epochs_total``.  :func:`load_stage` reads such a pair as the same :class:`StageCheckpoint` (without
records: ``results`` is ``None``), so older NNI runs still resume and retrain; it writes nothing back.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import atomic_torch_save, load_plain
from .errors import ConfigError, NasSplitError, RunFileError, UntrustedFileError
from .records import RunResult, StageRecord
from .surgery.export import FORMAT, build_grown, grown_payload
from .training import TrainConfig, make_optimizer

__all__ = ["CHECKPOINT_DIR", "StageCheckpoint", "ResumePoint", "stage_path", "save_stage", "load_stage",
           "latest_checkpoint", "resume_point", "restore_optimizer"]

#: The folder of a run directory that holds its stage checkpoints.
CHECKPOINT_DIR = "checkpoints"
_KEYS = ("stage", "model", "optimizer", "results")  # every checkpoint holds these; the rest is the method's state
_OLD_STATE_KEYS = ("optimizer", "run", "epochs_total")  # the older NNI ``.state.pt``, besides the method's state


@dataclass
class StageCheckpoint:
    """One stage as :func:`load_stage` reads it (from either layout).

    Attributes:
        path: the file (the model file, for the older NNI layout).
        model: the grown model's description (:func:`nas_split.surgery.export.grown_payload`).
        stage: the stage index (``None`` for the older NNI layout, which did not record it).
        optimizer: the optimizer's ``state_dict``, or ``None``.
        method_state: the growth method's ``state_dict`` (``spectra``, ``stages``; empty when none was saved).
        results: the run's records so far (``results.json`` layout), or ``None`` for a model file alone or the
            older NNI layout.
        config: the run's settings: ``results["config"]``, or the older NNI state's ``run`` (dataset, recipe).
        epochs_total: epochs the model was trained in all (``None`` when not known).
    """

    path: Path
    model: dict[str, Any]
    stage: int | None = None
    optimizer: dict[str, Any] | None = None
    method_state: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    epochs_total: int | None = None

    @property
    def records(self) -> list[StageRecord]:
        """The stage records of ``results`` (empty without)."""
        return [StageRecord.from_dict(s) for s in (self.results or {}).get("stages", [])]


def stage_path(folder: str | os.PathLike, stage: int) -> Path:
    """Where stage ``stage`` is saved in ``folder`` (a run directory's :data:`CHECKPOINT_DIR`, or the NNI
    strategy's ``checkpoint_dir``): ``<folder>/stage{stage}.pt``."""
    return Path(folder, f"stage{stage}.pt")


def save_stage(path: str | os.PathLike, stage: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
               results: dict[str, Any], method_state: dict[str, Any]) -> Path:
    """Write stage ``stage`` to ``path`` (atomically, plain data only): ``model`` as :func:`nas_split.save_grown`
    writes it, ``optimizer``'s state, the run's ``results`` so far (stages 0..``stage``) and the growth method's
    ``method_state`` (its ``state_dict()``)."""
    payload = {"stage": stage, "model": grown_payload(model),
               "optimizer": optimizer.state_dict() if optimizer is not None else None, "results": results,
               **method_state}
    return atomic_torch_save(path, payload)


def load_stage(path: str | os.PathLike) -> StageCheckpoint:
    """Read a stage checkpoint (``torch.load(weights_only=True)``: nothing named in the file is run): the one
    layout, or the older NNI pair (a model file with ``.state.pt`` beside it).  A :func:`nas_split.save_grown` file
    alone reads as a checkpoint with its model only.

    Raises:
        RunFileError: unreadable, or not a file of these layouts (one line naming the file and the first problem).
    """
    path = Path(path)
    where = f"stage checkpoint {str(path)!r}"
    payload = load_plain(path, "stage checkpoint")
    if isinstance(payload, dict) and payload.get("format") == FORMAT:  # a model file: the older NNI stage, or alone
        return _old_stage(path, payload)
    if not isinstance(payload, dict):
        raise RunFileError(f"{where} is not a stage checkpoint nas-split wrote")
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise RunFileError(f"{where} is not a stage checkpoint nas-split wrote (missing {', '.join(missing)})")
    res = RunResult.from_dict(payload["results"], where)
    stage = payload["stage"]
    if not isinstance(stage, int) or isinstance(stage, bool) or len(res.stages) != stage + 1:
        raise RunFileError(f"{where}: its records do not match its stage")
    if not isinstance(payload["model"], dict) or not isinstance(payload["optimizer"], dict | None):
        raise RunFileError(f"{where}: its model or optimizer state is not a mapping")
    return StageCheckpoint(path, payload["model"], stage, payload["optimizer"],
                           {k: v for k, v in payload.items() if k not in _KEYS}, payload["results"], res.config,
                           res.last.epochs_total)


def _old_stage(path: Path, model: dict[str, Any]) -> StageCheckpoint:
    """A model file, with the optimizer, method state and run settings of the older NNI ``.state.pt`` beside it."""
    state = path.with_suffix(".state.pt")
    if not state.is_file():
        return StageCheckpoint(path, model)
    st = load_plain(state, "stage state")
    if not (isinstance(st, dict) and isinstance(st.get("run"), dict)
            and isinstance(st.get("epochs_total", 0), int) and isinstance(st.get("optimizer"), dict | None)):
        raise RunFileError(f"{str(state)!r} is not a stage state nas-split wrote (no 'run' settings)")
    return StageCheckpoint(path, model, None, st.get("optimizer"),
                           {k: v for k, v in st.items() if k not in _OLD_STATE_KEYS}, None, st["run"],
                           st.get("epochs_total"))


def _stage_files(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(stage, path)`` of every ``checkpoints/stage{k}.pt`` of ``run_dir``, newest first."""
    return sorted(((int(p.stem[5:]), p) for p in Path(run_dir, CHECKPOINT_DIR).glob("stage*.pt")
                   if p.stem[5:].isdigit()), reverse=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """The last stage of a run directory that has a checkpoint file (not checked), if any."""
    found = _stage_files(run_dir)
    return found[0] if found else None


@dataclass
class ResumePoint:
    """A verified checkpoint to resume from: its stage, content and rebuilt model, and the newer ones skipped."""

    stage: int
    checkpoint: StageCheckpoint
    model: nn.Module
    skipped: list[str]


def _verify(stage: int, path: Path) -> tuple[StageCheckpoint, nn.Module]:
    """Load and check one checkpoint of a run; raises ``ValueError`` with the reason it cannot be resumed from."""
    try:
        ckpt = load_stage(path)
    except RunFileError as e:
        raise ValueError(str(e)) from None
    if ckpt.results is None:
        raise ValueError("a model file without the run's records, not a stage checkpoint")
    if ckpt.stage != stage:
        raise ValueError("its records do not match its stage")
    try:
        model = build_grown(ckpt.model)
    except UntrustedFileError:
        raise
    except Exception as e:
        raise ValueError(f"its model cannot be rebuilt ({type(e).__name__}: {str(e)[:120]})") from None
    return ckpt, model


def resume_point(run_dir: str | os.PathLike) -> ResumePoint:
    """The newest checkpoint of ``run_dir`` that loads and checks out; newer broken ones are listed as skipped.

    Raises:
        ConfigError: no checkpoint can be resumed from (the message lists why each was refused).
        UntrustedFileError: a checkpoint's model names a factory (nothing named in a file is run).
    """
    skipped = []
    for stage, path in _stage_files(run_dir):
        try:
            ckpt, model = _verify(stage, path)
        except ValueError as e:
            skipped.append(f"{path.name}: {e}")
            continue
        return ResumePoint(stage, ckpt, model, skipped)
    why = f" ({'; '.join(skipped)})" if skipped else f": no {CHECKPOINT_DIR}/stage*.pt"
    raise ConfigError(f"nothing to resume in {str(run_dir)!r}{why}")


def restore_optimizer(model: nn.Module, recipe: TrainConfig,
                      state: dict[str, Any] | None) -> torch.optim.Optimizer | None:
    """The optimizer a saved stage continues with: :func:`~nas_split.training.make_optimizer` for ``model`` and
    ``recipe``, with the moments of ``state`` (a checkpoint's ``optimizer``); the recipe's hyperparameters apply
    from here (a resumed run may change them).  ``None`` without a state.

    Raises:
        NasSplitError: ``state`` does not fit the model's parameters.
    """
    if state is None:
        return None
    optimizer = make_optimizer(model, recipe)
    recipe_groups = [{k: v for k, v in grp.items() if k != "params"} for grp in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as e:
        raise NasSplitError(f"the saved optimizer state does not fit the model ({type(e).__name__})") from None
    for grp, hyper in zip(optimizer.param_groups, recipe_groups, strict=True):
        grp.update(hyper)
    return optimizer
