"""Validated run configuration: YAML files plus ``key.sub=value`` overrides, checked by pydantic.

Unknown keys and values of the wrong type raise :class:`ConfigError` with one line naming the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from ._io import load_yaml, read_mapping
from .errors import ConfigError, first_problem
from .training import TrainConfig

__all__ = ["ConfigError", "AnytimeConfig", "RunConfig", "GrowthConfig", "GrowRunConfig", "Protocol",
           "MethodRunConfig",
           "NniRunConfig", "load_config", "apply_overrides", "validation_message", "upgrade_stored"]

M = TypeVar("M", bound=BaseModel)


class RunConfig(BaseModel):
    """What ``nas-split train`` runs: a dataset, a backbone and a training recipe."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "digits"
    dataset_options: dict[str, Any] = Field(default_factory=dict, description="passed to the dataset loader")
    data_dir: str | None = Field(None, description="directory of the dataset's files")
    backbone: str = "mobilenetv1_cifar_050"
    backbone_options: dict[str, Any] = Field(default_factory=dict, description="width_mult, widths, ...")
    train: TrainConfig = Field(default_factory=TrainConfig)
    out: str = "runs/train"
    latency: bool = Field(True, description="measure forward latency for the records")
    cost_model: str = Field("horowitz-45nm", description="what prices layers for the records, the reports and "
                            "energy-aware growth: a name of nas_split.cost.COST_MODELS or a profile file")

    @field_validator("cost_model")
    @classmethod
    def _cost_model(cls, v: str) -> str:
        from .cost import check_spec

        check_spec(v)  # a ConfigError is a ValueError: pydantic reports it under the key
        return v


class AnytimeConfig(BaseModel):
    """How an anytime run trains its levels.

    Attributes:
        levels: ``"all"`` levels so far, or the last ``K`` (``1``: the full model alone).
        optimizer: ``osgd`` (orthogonalized, smallest level first), ``sum`` (the summed losses) or ``last`` (the
            largest level alone: today's training, the ablation).
        bn: ``private`` running statistics per level, updated by each level's own forward in training, or
            ``recalibrate``: every level's statistics recomputed from ``recalibrate_batches`` training batches
            after each stage (:func:`nas_split.anytime.recalibrate`).
        unit: OSGD's unit of orthogonality, per parameter ``tensor`` or the whole ``vector``.
    """

    model_config = ConfigDict(extra="forbid")

    levels: Literal["all"] | PositiveInt = "all"
    optimizer: Literal["osgd", "sum", "last"] = "osgd"
    bn: Literal["private", "recalibrate"] = "private"
    recalibrate_batches: PositiveInt = Field(20, description="training batches per level with bn: recalibrate")
    unit: Literal["tensor", "vector"] = "tensor"


class GrowthConfig(BaseModel):
    """How ``nas-split grow`` grows the seed (see :class:`nas_split.Grower` for the meaning of each field; the
    fields the Grower takes, :data:`nas_split.grow_run.SPLITTING_ONLY`, apply to the splitting variants only)."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field("fast", description="a splitting variant (nas_split.splitting.variants.VARIANTS) or another "
                                            "registered growth method (vt, firefly, gradmax, random); checked "
                                            "against the registry by nas_split.grow_run.growth_method")
    rounds: int = Field(3, ge=0, description="growth rounds after the seed stage")
    seed_epochs: int | None = Field(None, ge=0, description="epochs of the seed stage (default train.epochs)")
    grow_ratio: float = Field(0.3, ge=0)
    eps: float = Field(1e-2, gt=0)
    c: float = Field(3.0, ge=1, description="S3D mass budget sum|w_i| <= c")
    max_copies: Literal[3, 4] = 4
    lra: bool | None = Field(None, description="learning-rate adaptation per growth stage for the new neurons "
                                               "(nas_split.growth.rates); default: the method's (vt: on, "
                                               "splitting: off)")
    variance_transfer: bool | None = Field(None, description="rescale the grown layers' consumers (nas_split."
                                                             "growth.variance); default: the method's (vt: on, "
                                                             "splitting: off)")
    mup: bool | None = Field(None, description="vt: muP per-layer learning-rate factors for the input and output "
                                               "layers (nas_split.growth.rates.LayerRates); default off")
    only_negative: bool = True
    s3d_rank: Literal["neuron", "total"] = Field("neuron", description="S3D: rank schemes and candidates by gain "
                                                 "per added neuron, or by total gain")
    selection: Literal["top", "reverse", "layer-random", "random-direction"] = Field(
        "top", description="the method's choice, or an ablation arm (nas_split.splitting.selection.ARMS)")
    energy_aware: bool = False
    cost: Literal["macs", "model"] = Field("macs", description="what the energy-aware LP prices: MACs or "
                                           "the run's cost_model")
    target_mmacs: float | None = Field(None, gt=0, allow_inf_nan=False,
                                       description="MAC target of the engine's geometric round schedule")
    budget_energy_uj: float | None = Field(None, gt=0, allow_inf_nan=False,
                                           description="stop once the energy estimate reaches this")
    max_width: int | None = Field(None, ge=1)
    round_to: int | None = Field(None, ge=1)
    carry_optimizer: bool = True
    beta: float = Field(3.0, gt=0, description="softplus surrogate curvature for ReLU/ReLU6")
    analysis_batches: int | None = Field(None, ge=1)
    fast_passes: int = Field(3, ge=1)
    fast_lr: float = Field(0.05, gt=0)
    anytime: AnytimeConfig | None = Field(None, description="keep every stage's widths as a level and train the "
                                          "levels together (nas_split.anytime_training); default off")
    depth: bool = Field(False, description="grow in depth too: each round may insert new blocks before its width "
                                           "step (firefly and the splitting methods; nas_split.growth.depth_scores)")
    max_blocks_per_stage: int = Field(1, ge=1, description="with depth: new blocks a round may insert")


class GrowRunConfig(RunConfig):
    """What ``nas-split grow`` runs: a :class:`RunConfig` plus the growth schedule."""

    growth: GrowthConfig = Field(default_factory=GrowthConfig)
    out: str = "runs/grow"


class Protocol(BaseModel):
    """The schedule every method of ``run`` / ``compare`` shares, so that all train the same total epochs
    ``seed_epochs + rounds x train.epochs + finetune_epochs`` (:attr:`nas_split.methods.MethodContext.scratch_epochs`).

    ``finetune_epochs`` trains a growth method's final network that many more epochs after its last growth step
    (the protocol of S2D's and the energy-aware paper's code), a pruned network that much longer, and a network
    trained from scratch that much longer.  ``schedule_span: run`` runs one learning-rate schedule over the whole
    run with the growth steps inside it (variance-transfer growth's protocol); ``stage`` restarts it every stage.
    ``growth_warmup_epochs`` ramps the rate up linearly at the start of every stage after a growth step.
    """

    model_config = ConfigDict(extra="forbid")

    seed_options: dict[str, Any] = Field(default_factory=lambda: {"width_mult": 0.25})
    rounds: int = Field(3, ge=0)
    seed_epochs: int | None = Field(None, ge=0, description="seed / full-model epochs (default train.epochs)")
    finetune_epochs: int = Field(0, ge=0, description="epochs after the last growth step (every method trains "
                                                      "them too)")
    schedule_span: Literal["stage", "run"] = Field("stage", description="one learning-rate schedule per stage, "
                                                   "or one over the whole run")
    growth_warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up after each growth step")


class MethodRunConfig(RunConfig, Protocol):
    """What ``nas-split run`` runs: one registered method (growth or baseline) under a MAC target or rounds, with
    the shared :class:`Protocol`.

    ``backbone_options`` build the full-width model (pruning starts there); ``seed_options`` are merged over them
    for the thin seed that growth methods start from.
    """

    method: str = "fast"
    method_options: dict[str, Any] = Field(default_factory=dict)
    target_mmacs: float | None = Field(None, gt=0, allow_inf_nan=False)
    out: str = "runs/method"


class NniRunConfig(GrowRunConfig):
    """What ``nas-split nni`` runs: a :class:`GrowRunConfig` as an NNI experiment on one of its engines."""

    engine: Literal["sequential", "ts"] = "sequential"
    port: int = Field(8080, gt=1024, lt=65536, description="NNI manager / web UI port (ts engine)")
    out: str = "runs/nni"


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings to a nested dict; values are parsed as YAML (``3``, ``0.1``, ``[8, 16]``, ``x``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = nxt
        try:
            node[parts[-1]] = load_yaml(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e.problem})") from None
    return data


#: Config keys of earlier versions and their names now: a file that uses one gets a one-line hint.
RENAMED = {"budget_mmacs": "target_mmacs", "targets_mmacs": "target_mmacs"}


def upgrade_stored(config: dict[str, Any]) -> dict[str, Any]:
    """A configuration nas-split itself stored (a run's ``results.json`` or checkpoint) with the keys of earlier
    versions renamed (:data:`RENAMED`), so runs written before a rename still resume; a user's own files get the
    one-line hint of :func:`validation_message` instead."""
    return {RENAMED.get(k, k): upgrade_stored(v) if isinstance(v, dict) else v for k, v in config.items()}


def validation_message(err: ValidationError) -> str:
    """One line naming the first invalid key of a pydantic error (with the new name of a :data:`RENAMED` key)."""
    key, _, first = first_problem(err)
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        head, _, last = key.rpartition(".")
        if last in RENAMED:
            return f"config key {key!r} was renamed: use {'.'.join(filter(None, (head, RENAMED[last])))!r}{more}"
        return f"config key {key!r} does not exist{more}"
    return f"config value {key}={first.get('input')!r}: {first['msg']}{more}"


def load_config(model: type[M], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> M:
    """Build ``model`` from ``base``, then the YAML file ``path``, then ``overrides`` (later wins)."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        loaded = read_mapping(path, "config file")
        data = _merge(data, loaded)
    data = apply_overrides(data, overrides or [])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(validation_message(e)) from None


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
