"""Shared helpers: normalised tensor datasets and deterministic train / val / test partitions."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset


def partition_indices(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Stratified partition of ``range(len(labels))`` into parts of the given fractions (the last takes the rest).

    Each sample gets the key ``(rank within its class + U[0, 1)) / class size`` from a seeded permutation; sorting
    by key and cutting at the global fractions gives exact part sizes and per-class shares within one sample.
    """
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keys[idx[rng.permutation(len(idx))]] = (np.arange(len(idx)) + rng.random(len(idx))) / len(idx)
    order = np.argsort(keys, kind="stable")
    cuts = np.round(np.cumsum(fractions) * len(labels)).astype(int)
    return [np.sort(part) for part in np.split(order, cuts)]


def tensor_dataset(x: np.ndarray, y: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> TensorDataset:
    """``TensorDataset`` of float32 samples normalised per channel (axis 1) and int64 labels."""
    xt = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    shape = (1, -1) + (1,) * (xt.dim() - 2)
    xt = (xt - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)
    return TensorDataset(xt, torch.as_tensor(y, dtype=torch.int64))


class Augmented(Dataset):
    """Applies ``transform`` to the sample of every item of ``base`` (training-time augmentation)."""

    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return self.transform(x), y
