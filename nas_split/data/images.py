"""Image datasets: scikit-learn digits (bundled), Fashion-MNIST (IDX files), CIFAR-10/100 (python pickles)."""
from __future__ import annotations

import gzip
import os
import pickle
import zlib
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ._partition import Augmented, partition_indices, tensor_dataset
from ._registry import DataFormatError, DataNotFoundError, DatasetInfo, DataSplits, register_dataset

__all__ = ["read_idx", "read_cifar", "find_fashion_mnist", "FASHION_MNIST_DIRS", "balanced_subset"]

#: Where Fashion-MNIST is looked for when no root is given: ``$NAS_SPLIT_DATA[/fashion-mnist]``, then the
#: directory Debian's ``dataset-fashion-mnist`` package installs.
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
_FMNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain), the format of MNIST and Fashion-MNIST.

    The header is two zero bytes, a type code, the number of dimensions ``d``, then ``d`` big-endian int32 sizes.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a truncated .gz ends in EOFError
        raise DataFormatError(f"{path}: cannot be read as {'gzip' if opener is gzip.open else 'a file'} "
                              f"({type(e).__name__}: {e or 'truncated'})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataFormatError(f"{path}: not an IDX file (bad magic {data[:4].hex()})")
    ndim = data[3]
    itemsize = np.dtype(_IDX_DTYPES[data[2]]).itemsize
    if len(data) < 4 + 4 * ndim or (len(data) - 4 - 4 * ndim) % itemsize:
        raise DataFormatError(f"{path}: truncated IDX file ({len(data)} bytes)")
    dims = np.frombuffer(data, ">i4", count=ndim, offset=4).astype(int)
    arr = np.frombuffer(data, _IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataFormatError(f"{path}: header says {tuple(dims)} but the file holds {arr.size} values")
    return arr.reshape(tuple(dims))


def _candidate_dirs(root: str | None, sub: str, defaults: tuple[str, ...]) -> list[Path]:
    if root is not None:
        return [Path(root), Path(root) / sub]
    env = os.environ.get("NAS_SPLIT_DATA")
    dirs = [Path(env), Path(env) / sub] if env else []
    return dirs + [Path(d) for d in defaults]


def find_fashion_mnist(root: str | None = None) -> Path:
    """Directory holding the four Fashion-MNIST ``.gz`` files (see :data:`FASHION_MNIST_DIRS`)."""
    dirs = _candidate_dirs(root, "fashion-mnist", FASHION_MNIST_DIRS)
    names = [n for pair in _FMNIST_FILES.values() for n in pair]
    for d in dirs:
        if all((d / n).is_file() for n in names):
            return d
    raise DataNotFoundError(
        f"Fashion-MNIST files ({names[0]}, ...) not found in {', '.join(map(str, dirs))}; "
        "install them with `apt-get install dataset-fashion-mnist`, or pass --data-dir / set NAS_SPLIT_DATA")


def _images(name, x_train, y_train, x_test, y_test, mean, std, seed, val_fraction, train_transform=None):
    tr, va = partition_indices(y_train, (1.0 - val_fraction,), seed)
    info = DatasetInfo(name, "image", tuple(x_train.shape[1:]), int(y_train.max()) + 1, mean, std)
    train = tensor_dataset(x_train[tr], y_train[tr], mean, std)
    if train_transform is not None:
        train = Augmented(train, train_transform)
    return DataSplits(info, train, tensor_dataset(x_train[va], y_train[va], mean, std),
                      tensor_dataset(x_test, y_test, mean, std))


@register_dataset("digits", "scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes; no download)",
                  reads_files=False)
def digits(seed: int = 0, root: str | None = None, val_fraction: float = 0.1, test_fraction: float = 0.2) -> DataSplits:
    """Digits, stratified into train / val / test by ``seed`` (default 70 / 10 / 20 %)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    rest, test = partition_indices(y, (1.0 - test_fraction,), seed)
    return _images("digits", x[rest], y[rest], x[test], y[test], (0.3053,), (0.3760,), seed,
                   val_fraction / (1.0 - test_fraction))


def _fashion_arrays(root: str | None) -> tuple[np.ndarray, ...]:
    d = find_fashion_mnist(root)
    out = []
    for split in ("train", "test"):
        names = _FMNIST_FILES[split]
        img, lab = (read_idx(d / n) for n in names)
        if img.ndim != 3 or lab.ndim != 1 or len(img) != len(lab):
            raise DataFormatError(f"{d}: {names[0]} holds {img.shape[0] if img.ndim else 0} images of shape "
                                  f"{img.shape[1:]} but {names[1]} holds {len(lab)} labels")
        out += [(img.astype(np.float32) / 255.0)[:, None], lab.astype(np.int64)]
    return tuple(out)


@register_dataset("fashion-mnist", "Fashion-MNIST 28x28 (IDX files; Debian package dataset-fashion-mnist)")
def fashion_mnist(seed: int = 0, root: str | None = None, val_fraction: float = 1 / 12,
                  train_size: int | None = None) -> DataSplits:
    """Fashion-MNIST: the official 60k train (``val_fraction`` held out by ``seed``) and 10k test images.

    ``train_size`` keeps a fixed class-balanced subset of the training images (the same for every seed), for
    short benchmarks on CPUs; the test set stays whole.
    """
    x_tr, y_tr, x_te, y_te = _fashion_arrays(root)
    if train_size is not None:
        if not 10 <= train_size <= len(y_tr):
            raise ConfigError(f"dataset_options.train_size must be in 10..{len(y_tr)}, got {train_size}")
        keep = balanced_subset(y_tr, train_size)
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    return _images("fashion-mnist", x_tr, y_tr, x_te, y_te, (0.2860,), (0.3530,), seed, val_fraction)


def balanced_subset(labels: np.ndarray, size: int, seed: int = 20191) -> np.ndarray:
    """Sorted indices of ``size`` samples, as equal per class as ``size`` allows, drawn with a fixed ``seed``."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    counts = np.full(len(classes), size // len(classes))
    counts[:size % len(classes)] += 1
    return np.sort(np.concatenate([p[:k] for p, k in zip(per, counts, strict=True)]))


def read_cifar(directory: str | os.PathLike, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read the python-pickle release of CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100
    (``train``, ``test``): images ``(N, 3, 32, 32)`` uint8 and labels (fine labels for CIFAR-100)."""
    d = Path(directory)
    files = ([d / f"data_batch_{i}" for i in range(1, 6)] if train else [d / "test_batch"]) \
        if (d / "test_batch").exists() else [d / ("train" if train else "test")]
    xs, ys = [], []
    for f in files:
        if not f.is_file():
            raise DataNotFoundError(f"CIFAR file {f} not found")
        with open(f, "rb") as fh:
            batch = pickle.load(fh, encoding="latin1")
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


_CIFAR = {"cifar10": ("cifar-10-batches-py", "CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
          "cifar100": ("cifar-100-python", "CIFAR100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}


def _cifar(name: str, seed: int, root: str | None, download: bool, val_fraction: float, augment: bool) -> DataSplits:
    sub, tv_cls, mean, std = _CIFAR[name]
    base = Path(root or os.environ.get("NAS_SPLIT_DATA") or "~/.cache/nas_split").expanduser()
    if not (base / sub).is_dir():
        if not download:
            raise DataNotFoundError(f"{name} not found in {base / sub}; pass download=True (--download) to fetch it "
                                    "with torchvision, or point --data-dir at the extracted python release")
        import torchvision

        getattr(torchvision.datasets, tv_cls)(str(base), train=True, download=True)
    x_tr, y_tr = read_cifar(base / sub, True)
    x_te, y_te = read_cifar(base / sub, False)
    transform = None
    if augment:
        from torchvision.transforms import v2

        transform = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])
    return _images(name, x_tr.astype(np.float32) / 255.0, y_tr, x_te.astype(np.float32) / 255.0, y_te, mean, std,
                   seed, val_fraction, transform)


@register_dataset("cifar10", "CIFAR-10 32x32 (torchvision download on request)")
def cifar10(seed: int = 0, root: str | None = None, download: bool = False, val_fraction: float = 0.1,
            augment: bool = True) -> DataSplits:
    """CIFAR-10 with ``val_fraction`` of the train set held out; random crop + flip on train when ``augment``."""
    return _cifar("cifar10", seed, root, download, val_fraction, augment)


@register_dataset("cifar100", "CIFAR-100 32x32 (torchvision download on request)")
def cifar100(seed: int = 0, root: str | None = None, download: bool = False, val_fraction: float = 0.1,
             augment: bool = True) -> DataSplits:
    """CIFAR-100 (fine labels), as :func:`cifar10`."""
    return _cifar("cifar100", seed, root, download, val_fraction, augment)
