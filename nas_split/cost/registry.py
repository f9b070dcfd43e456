"""Cost models by name: the value of ``cost_model:`` in a run or comparison configuration."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from .latency import LatencyTable
from .models import CostModel, EnergyModel
from .profiles import ProfileModel

__all__ = ["COST_MODELS", "check_spec", "cost_model"]


def _latency(device: str | None = None) -> LatencyTable:
    return LatencyTable(device or ("cuda" if torch.cuda.is_available() else "cpu"))


#: Cost models by name (the value of ``cost_model:`` in a run or comparison configuration); anything else is
#: read as the path of a profile file.
COST_MODELS = {"horowitz-45nm": EnergyModel, "horowitz-45nm-sram": EnergyModel.sram, "latency": _latency,
               "latency-cpu": lambda: _latency("cpu"), "latency-cuda": lambda: _latency("cuda")}


def check_spec(spec: str) -> None:
    """Raise :class:`ConfigError` unless ``spec`` is a :data:`COST_MODELS` name or an existing file."""
    if spec not in COST_MODELS and not Path(spec).expanduser().is_file():
        raise ConfigError(f"cost_model {spec!r} is neither a known model ({', '.join(COST_MODELS)}) nor a file")


def cost_model(spec: str | CostModel | None = None) -> CostModel:
    """The cost model ``spec`` names: a :data:`COST_MODELS` name, a profile file's path, or a model (returned as
    it is); ``None`` is ``horowitz-45nm``."""
    if isinstance(spec, CostModel):
        return spec
    spec = spec or "horowitz-45nm"
    check_spec(spec)
    return COST_MODELS[spec]() if spec in COST_MODELS else ProfileModel.load(Path(spec).expanduser())
