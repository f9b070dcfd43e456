"""Dataset registry: every dataset gives deterministic train/val/test splits plus a :class:`DatasetInfo`."""
from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["DatasetInfo", "DataSplits", "DataNotFoundError", "UnknownDatasetError", "register_dataset",
           "create_dataset", "list_datasets", "dataset_info"]


class DataNotFoundError(FileNotFoundError):
    """The files of a dataset are not where the loader looked; the message says where and how to get them."""


class UnknownDatasetError(KeyError):
    """A dataset name that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


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


_DATASETS: dict[str, _Entry] = {}


def register_dataset(name: str, description: str) -> Callable:
    """Decorator registering ``fn(seed=0, root=None, **options) -> DataSplits`` under ``name``."""

    def deco(fn: Callable[..., DataSplits]) -> Callable[..., DataSplits]:
        _DATASETS[name] = _Entry(fn, description)
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
        **options: dataset-specific options (``num_points``, ``download``, ``val_fraction``...).
    """
    return _entry(name).fn(seed=seed, root=root, **options)
