"""Search → export → **retrain**: train a found architecture again from fresh weights, with the scratch recipe.

A growth or pruning run (or an NNI stage) ends with a model whose weights carry its history; the NAS protocol
judges the *architecture* by training it from scratch.  :func:`retrain_config` reads what a source says about
itself and :func:`retrain` runs the ``retrain`` method (:class:`nas_split.methods.RetrainMethod`) on it.  Sources:

* a ``nas-split run`` / ``compare`` run directory (``model.pt`` and ``results.json``);
* a ``nas-split grow`` or ``nas-split nni`` run directory (its newest good checkpoint);
* a model file: a stage checkpoint (:mod:`nas_split.checkpoints`: ``grow``'s, or a stage exported from the NNI
  strategy, ``export_top_models(formatter="dict")`` giving ``{"checkpoint": path, ...}``; an NNI stage of the older
  layout, with its ``.state.pt`` beside it, too), or any :func:`nas_split.save_grown` file (then ``dataset`` must
  be given);
* an exported NNI sample (the dict itself).

``level`` (``nas-split retrain --level K``) retrains level ``K`` of an anytime model (its widths after growth stage
``K``, :func:`nas_split.anytime.extract`) instead of the whole model.

The recipe is the source's own (optimizer, learning rate, batch size, seed, dataset); the epochs default to as
many as the source model was trained in all (its last stage's ``epochs_total``), in one stage, like ``scratch``.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import MethodRunConfig, load_config
from .errors import ConfigError, RunFileError
from .records import RunResult

__all__ = ["retrain_config", "retrain"]

_RUN_KEYS = ("dataset", "dataset_options", "data_dir", "train", "latency")
#: Keys of a run configuration that a retraining fixes (its architecture, its one stage) and refuses to take.
_ARCHITECTURE_KEYS = frozenset({"method", "method_options", "backbone", "backbone_options", "seed_options", "rounds",
                                "seed_epochs", "target_mmacs", "finetune_epochs", "schedule_span",
                                "growth_warmup_epochs"})


def _settings(config: dict[str, Any], epochs: int | None, where: str) -> tuple[dict[str, Any], int | None]:
    """``(config, epochs)`` of a source, checked: :class:`RunFileError` if ``config`` holds a non-mapping where a
    mapping belongs."""
    bad = [k for k in ("train", "dataset_options") if not isinstance(config.get(k, {}), dict)]
    if bad:
        raise RunFileError(f"{where} is not a results file nas-split wrote: config.{bad[0]} is not a mapping")
    return config, epochs


def _source(source: str | Path | Mapping[str, Any]) -> tuple[Path, dict[str, Any], int | None]:
    """``(architecture file, run settings, epochs the source trained)`` of a source (see the module doc)."""
    from .checkpoints import load_stage, resume_point
    from .experiment import MODEL_FILE

    if isinstance(source, Mapping):
        if "checkpoint" not in source:
            raise ConfigError("an exported NNI sample must hold 'checkpoint' (export_top_models(formatter='dict'))")
        source = source["checkpoint"]
    p = Path(source)
    if p.is_dir():
        if (p / MODEL_FILE).is_file():
            if not (p / "results.json").is_file():
                raise ConfigError(f"{str(p)!r} holds {MODEL_FILE} but no results.json")
            path = p / "results.json"
            res = RunResult.load(path)
            return p / MODEL_FILE, *_settings(res.config, res.last.epochs_total if res.stages else None,
                                              repr(str(path)))
        ckpt = resume_point(p).checkpoint  # a grow run: its newest good checkpoint (raises naming what is wrong)
    elif p.is_file():
        ckpt = load_stage(p)  # a stage checkpoint (either layout), or a model file alone (no settings)
    else:
        raise ConfigError(f"{str(p)!r} is neither a run directory nor a model file")
    return ckpt.path, *_settings(ckpt.config, ckpt.epochs_total, repr(str(ckpt.path)))


def retrain_config(source: str | Path | Mapping[str, Any], overrides: list[str] | None = None,
                   out: str | None = None, level: int | None = None) -> MethodRunConfig:
    """The ``retrain`` run of ``source``: its architecture file, dataset and recipe, one stage of as many epochs as
    the source model trained (``train.epochs`` in ``overrides`` sets them), written to ``out`` (default: beside
    the source, ``<name>-retrain``, or ``<name>-retrain-L<level>``).  ``level`` retrains one level of an anytime
    model (:mod:`nas_split.anytime`) instead of the whole model.

    ``overrides`` are ``key=value`` strings of :class:`~nas_split.config.MethodRunConfig` (e.g.
    ``dataset=digits``, ``train.seed=3``).

    Raises:
        ConfigError: the source cannot be read, or does not say which dataset it was trained on and
            ``overrides`` do not either.
    """
    from .surgery.export import read_grown

    if level is not None and (isinstance(level, bool) or not isinstance(level, int) or level < 0):
        raise ConfigError(f"--level is a level's index, 0 (the seed's widths) or more, got {level!r}")
    overrides = list(overrides or [])
    fixed = sorted({o.partition("=")[0].strip().split(".")[0] for o in overrides} & _ARCHITECTURE_KEYS)
    if fixed:
        raise ConfigError(f"retrain trains the source's architecture in one stage: {fixed[0]!r} cannot be set "
                          "(it would be ignored or change the architecture)")
    if isinstance(source, str | Path):
        source = Path(source).resolve()  # "." or a relative path names the run by its directory
    arch, run, epochs = _source(source)
    spec = read_grown(arch)["spec"]
    base: dict[str, Any] = {k: run[k] for k in _RUN_KEYS if k in run}
    if "space" in spec:
        base["backbone"] = spec["space"]
    elif "timm" in spec:
        base["backbone"] = spec["timm"]
    train = dict(base.get("train", {}))
    if epochs is not None:
        train["epochs"] = epochs
    base["train"] = train
    if "dataset" not in base and not any(o.partition("=")[0].strip() == "dataset" for o in overrides):
        raise ConfigError(f"{str(arch)!r} does not say which dataset it was trained on: pass --dataset")
    name = Path(source["checkpoint"] if isinstance(source, Mapping) else source)
    suffix = "-retrain" if level is None else f"-retrain-L{level}"
    base.update(method="retrain", method_options={"architecture": str(arch)} if level is None else
                {"architecture": str(arch), "level": level}, rounds=0, seed_options={},
                out=out or str(name.with_name(f"{name.stem if name.is_file() else name.name}{suffix}")))
    cfg = load_config(MethodRunConfig, None, overrides, base=base)
    # one stage of train.epochs epochs: the scratch schedule with no rounds and no fine-tuning
    return cfg.model_copy(update={"seed_epochs": cfg.train.epochs, "rounds": 0, "finetune_epochs": 0})


def retrain(source: str | Path | Mapping[str, Any], overrides: list[str] | None = None, out: str | None = None,
            overwrite: bool = False, level: int | None = None) -> dict:
    """Retrain ``source``'s architecture from scratch (:func:`retrain_config`) and write its run directory;
    returns its ``results.json``.

    From NNI::

        for sample in exp.export_top_models(top_k=1, formatter="dict"):
            results = retrain(sample, out="runs/best-retrained")   # from nas_split.retrain import retrain
    """
    from .experiment import run_method

    return run_method(retrain_config(source, overrides, out, level), overwrite=overwrite)
