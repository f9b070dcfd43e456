"""Shared helpers: normalised tensor datasets and deterministic splits."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset


def split_indices(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Stratified split of ``range(len(labels))`` into parts of the given fractions (the last takes the rest)."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.cumsum([int(round(f * len(idx))) for f in fractions])
        for p, chunk in zip(parts, np.split(idx, cuts), strict=True):
            p.extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


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
