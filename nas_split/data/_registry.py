"""Dataset registry: every dataset gives deterministic train/val/test splits plus a :class:`DatasetInfo`."""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import ValidationError, validate_call
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, NasSplitError

__all__ = ["DatasetInfo", "DataSplits", "DataNotFoundError", "DataFormatError", "UnknownDatasetError",
           "register_dataset", "create_dataset", "list_datasets", "dataset_info"]


class DataNotFoundError(NasSplitError, FileNotFoundError):
    """The files of a dataset are not where the loader looked; the message says where and how to get them."""


class DataFormatError(NasSplitError, ValueError):
    """A dataset file that exists but cannot be read (not the expected format, truncated, inconsistent)."""


class UnknownDatasetError(NasSplitError, KeyError):
    """A dataset name that is not registered."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset declares.

    Attributes:
        name: registry name.
        kind: ``"image"`` (samples are ``(C, H, W)``) or ``"points"`` (samples are ``(C, N)``).
        input_shape: shape of one sample.
        num_classes: number of classes; labels are ``0 .. num_classes - 1``.
        mean, std: per-channel normalisation already applied to the samples.
    """

    name: str
    kind: str
    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_chans(self) -> int:
        """Channels of an image, or features per point."""
        return self.input_shape[0]

    @property
    def input_size(self) -> int:
        """Image side in pixels, or number of points."""
        return self.input_shape[-1]


@dataclass
class DataSplits:
    """The three splits of a dataset and its :class:`DatasetInfo`."""

    info: DatasetInfo
    train: Dataset
    val: Dataset
    test: Dataset

    def loaders(self, batch_size: int = 64, eval_batch_size: int | None = None, num_workers: int = 0,
                seed: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
        """Train (shuffled with a generator seeded by ``seed``), val and test loaders."""
        g = torch.Generator().manual_seed(seed)
        eb = eval_batch_size or max(batch_size, 256)
        kw = {"num_workers": num_workers, "persistent_workers": num_workers > 0}
        return (DataLoader(self.train, batch_size, shuffle=True, generator=g, drop_last=len(self.train) > batch_size,
                           **kw),
                DataLoader(self.val, eb, **kw), DataLoader(self.test, eb, **kw))


@dataclass(frozen=True)
class _Entry:
    fn: Callable[..., DataSplits]
    description: str
    reads_files: bool


_DATASETS: dict[str, _Entry] = {}


def register_dataset(name: str, description: str, reads_files: bool = True) -> Callable:
    """Decorator registering ``fn(seed=0, root=None, **options) -> DataSplits`` under ``name``.

    ``reads_files=False`` marks a dataset that is bundled or generated, for which a ``root`` is refused.
    """

    def deco(fn: Callable[..., DataSplits]) -> Callable[..., DataSplits]:
        _DATASETS[name] = _Entry(fn, description, reads_files)
        return fn

    return deco


def list_datasets() -> list[str]:
    """Registered dataset names."""
    return sorted(_DATASETS)


def dataset_info(name: str) -> str:
    """One-line description of a dataset."""
    return _entry(name).description


def _entry(name: str) -> _Entry:
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, list_datasets(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(list_datasets())}"
        raise UnknownDatasetError(f"unknown dataset {name!r}{hint}")
    return _DATASETS[name]


def create_dataset(name: str, seed: int = 0, root: str | None = None, **options) -> DataSplits:
    """Load dataset ``name`` and split it deterministically by ``seed``.

    Args:
        name: a registered name (see :func:`list_datasets`).
        seed: fixes the train/val split, sampling of points and synthetic data.
        root: directory of the dataset's files (datasets that read files; default per dataset).
        **options: dataset-specific options (``num_points``, ``download``, ``val_fraction``...), validated against
            the loader's signature and type hints; fractions must lie in (0, 1).

    Raises:
        ConfigError: an option the loader does not take, of the wrong type or out of range, or a ``root`` for a
            dataset that reads no files.
    """
    entry = _entry(name)
    if root is not None and not entry.reads_files:
        raise ConfigError(f"dataset {name!r} reads no files (it is bundled or generated); data_dir / --data-dir "
                          "does not apply to it")
    for key in ("val_fraction", "test_fraction"):
        v = options.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and not 0 < v < 1:
            raise ConfigError(f"dataset_options.{key}={v!r}: must lie strictly between 0 and 1")
    try:
        return validate_call(entry.fn)(seed=seed, root=root, **options)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "unexpected_keyword_argument":
            raise ConfigError(f"dataset_options.{key}: dataset {name!r} takes no such option "
                              f"(it takes {', '.join(_options(entry.fn))})") from None
        raise ConfigError(f"dataset_options.{key}={err.get('input')!r}: {err['msg']}") from None


def _options(fn: Callable) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p not in ("seed", "root")]
