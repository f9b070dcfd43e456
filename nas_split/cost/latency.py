"""Latency, measured: one forward timer (:func:`time_forward`), a whole model's latency (:func:`measure_latency`)
and a per-layer-shape table cached per machine (:class:`LatencyTable`, a cost model).

The table is timed with ``torch.utils.benchmark`` the first time a shape is priced and cached in a JSON file keyed
by the device name, the torch version and the thread count (:func:`latency_cache_path`).
"""
from __future__ import annotations

import logging
import os
import platform
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._io import atomic_write_json, read_mapping
from ..errors import ConfigError
from ..numerics import evaluating, like_model
from .counting import first_sample
from .models import CostModel, table_step
from .profiles import ProfileFile
from .shapes import LayerShape

if TYPE_CHECKING:
    from torch.utils.benchmark import Measurement

__all__ = ["time_forward", "measure_latency", "LatencyTable", "latency_cache_path", "device_name"]

_INSTANCES = 8  # copies of a layer a latency table times, one after the other


def time_forward(module: nn.Module, x: torch.Tensor, min_run_time: float) -> Measurement:
    """Time ``module(x)`` without autograd: one warm-up call (allocations, cuDNN's algorithm choice), then
    ``torch.utils.benchmark.Timer.blocked_autorange`` for ``min_run_time`` s at this process's thread count."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on CPU hosts
    from torch.utils import benchmark

    timer = benchmark.Timer("module(x)", globals={"module": module, "x": x}, num_threads=torch.get_num_threads())
    with torch.no_grad():
        module(x)
        return timer.blocked_autorange(min_run_time=min_run_time)


def measure_latency(model: nn.Module, example_inputs: torch.Tensor, min_run_time: float = 0.3) -> float:
    """Median forward latency in milliseconds for one sample (eval mode, no grad)."""
    x = like_model(model, first_sample(example_inputs))
    with evaluating(model):
        return time_forward(model, x, min_run_time).median * 1e3


def device_name(device: str) -> str:
    """The name of ``device`` (``cpu`` or ``cuda[:i]``): the GPU's name, or the CPU's model name."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def latency_cache_path(device: str = "cpu", cache_dir: str | Path | None = None) -> Path:
    """The cache file of ``device``'s latency table: one per device name, torch version and (CPU) thread count,
    under ``cache_dir``, ``$NAS_SPLIT_CACHE`` or ``~/.cache/nas_split``, in ``latency/``."""
    base = Path(cache_dir or os.environ.get("NAS_SPLIT_CACHE") or "~/.cache/nas_split").expanduser()
    threads = "" if device.startswith("cuda") else f"-{torch.get_num_threads()}threads"
    return base / "latency" / f"{_slug(device_name(device))}-torch{torch.__version__.split('+')[0]}{threads}.json"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower()


class LatencyTable(CostModel):
    """Measured batch-1 forward latency of each layer shape on ``device``, in ms; a shape is timed the first time it
    is priced (``torch.utils.benchmark``, eval mode, no grad, the median of ``min_run_time`` s of runs) and the
    table is written to :func:`latency_cache_path` after each new entry, so each shape is timed once per machine.

    Each entry keeps the median over the timing blocks of eight copies of the layer and their spread
    (``low``/``high``: the 10th and 90th percentiles; ``min``/``max``: the fastest and slowest block).
    The sum over layers is a prediction of the model's latency: it leaves out norms, activations, pooling and
    the time between kernels (MACs outside conv/linear layers cost 0 here).
    """

    measured = True
    unit = "ms"

    def __init__(self, device: str = "cpu", cache_dir: str | Path | None = None, min_run_time: float = 0.15):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("cost_model latency-cuda needs a GPU; this machine has none")
        self.device, self.min_run_time, self.name = device, min_run_time, device_name(device)
        self.path = latency_cache_path(device, cache_dir)
        self.label = f"latency-{_slug(self.name)}"
        self.source = (f"measured here: torch.utils.benchmark, batch 1, {self.name}, "
                       f"torch {torch.__version__}" + ("" if device.startswith("cuda") else
                                                      f", {torch.get_num_threads()} threads"))
        self.entries: dict[str, dict[str, Any]] = {}
        self.cached = True  # False once the cache could not be written: measured entries then live in memory
        try:
            if self.path.is_file():
                f = ProfileFile.read(read_mapping(self.path, "latency cache"), f"latency cache {str(self.path)!r}")
                self.entries = {LayerShape.from_config(e.model_dump()).key(): e.model_dump(exclude_none=True)
                                for e in f.layers}
        except (ConfigError, OSError) as e:  # a damaged or unreadable cache is measured again
            logging.getLogger(__name__).warning("ignoring the latency cache: %s", e)

    def layer_cost(self, shape: LayerShape) -> float:
        return self.entry(shape)["cost"]

    def channel_cost(self, shape: LayerShape, d_out: int, d_in: int) -> float:
        """The measured slope over :func:`table_step` channels (one channel's time is below the timing noise),
        at least 0."""
        k = table_step(shape)
        return max(0.0, (self.layer_cost(shape.grown(k * d_out, k * d_in)) - self.layer_cost(shape)) / k)

    def entry(self, shape: LayerShape) -> dict[str, Any]:
        """The table's entry of ``shape`` (``cost`` = median ms and the spread of :meth:`time`), timed if new."""
        key = shape.key()
        if key not in self.entries:
            self.entries[key] = {**shape.config(), **self.time(shape)}
            self.save()
        return self.entries[key]

    def time(self, shape: LayerShape) -> dict[str, float]:
        """Time :data:`_INSTANCES` freshly built copies of a layer of ``shape`` (two instances of one layer differ
        by a few percent in speed, from where their tensors lie in memory), each with
        ``torch.utils.benchmark.Timer.blocked_autorange`` for a share of ``min_run_time``: ``{cost: median ms per
        call over all blocks, low, high: their 10th and 90th percentiles, min, max: the fastest and slowest block,
        runs: calls}``."""
        blocks: list[float] = []
        runs = 0
        for _ in range(_INSTANCES):
            module, x = shape.build()
            m = time_forward(module.to(self.device).eval(), x.to(self.device), self.min_run_time / _INSTANCES)
            blocks += m.times
            runs += m.number_per_run * len(m.times)
        q = torch.tensor(blocks, dtype=torch.float64).quantile(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
        low, median, high = (1e3 * v for v in q.tolist())
        return {"cost": median, "low": low, "high": high, "min": 1e3 * min(blocks), "max": 1e3 * max(blocks),
                "runs": runs}

    def save(self) -> None:
        """Write the table (atomically) as a profile file :class:`ProfileModel` can read.  Where the cache cannot be
        written (``$NAS_SPLIT_CACHE`` under a file, a read-only directory) it warns once and the table lives in
        memory: every shape is still timed once per run."""
        if not self.cached:
            return
        try:
            atomic_write_json(self.path, {"name": self.label, "unit": self.unit, "measured": True,
                                          "source": self.source, "device": self.name,
                                          "torch": torch.__version__, "layers": list(self.entries.values())})
        except OSError as e:
            self.cached = False
            warnings.warn(f"nas-split: cannot write the latency cache {str(self.path)!r} ({e.strerror or e}); "
                          "measuring without caching (set NAS_SPLIT_CACHE to a writable directory)", stacklevel=2)
