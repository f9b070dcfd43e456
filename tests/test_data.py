"""Datasets return what they declare; file loaders read files written here in the original formats."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from nas_split.data import DataNotFoundError, UnknownDatasetError, create_dataset, list_datasets
from nas_split.data.images import read_cifar, read_idx
from nas_split.data.points import SHAPES


def _check(splits, n_classes=None):
    info = splits.info
    for part in (splits.train, splits.val, splits.test):
        assert len(part) > 0
        x, y = part[0]
        assert tuple(x.shape) == info.input_shape and x.dtype == torch.float32
        assert y.dtype == torch.int64
    labels = torch.cat([torch.as_tensor([part[i][1] for i in range(len(part))]) for part in
                        (splits.train, splits.val, splits.test)])
    assert labels.min() >= 0 and labels.max() < info.num_classes
    if n_classes is not None:
        assert info.num_classes == n_classes
    return labels


def _write_idx(path, arr: np.ndarray):
    code = {np.uint8: 0x08}[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">i", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


@pytest.fixture
def fmnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 120), ("t10k", 40)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return tmp_path


def test_registry_lists_every_dataset():
    assert {"digits", "fashion-mnist", "cifar10", "cifar100", "modelnet40", "shapes3d", "digits-points",
            "fashion-mnist-points"} <= set(list_datasets())
    with pytest.raises(UnknownDatasetError, match="did you mean digits"):
        create_dataset("digit")


def test_digits_declared_shape_and_stratified_split():
    s = create_dataset("digits", seed=0)
    labels = _check(s, 10)
    assert s.info.input_shape == (1, 8, 8) and len(labels) == 1797
    assert len(s.test) == pytest.approx(0.2 * 1797, abs=10) and len(s.val) == pytest.approx(0.1 * 1797, abs=10)
    x = s.train.tensors[0]
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1  # normalisation declared = applied
    test_counts = np.bincount(s.test.tensors[1].numpy(), minlength=10)
    assert test_counts.min() >= 33  # stratified: every class has ~20 % of its ~180 images in test


def test_splits_deterministic_by_seed():
    a, b, c = (create_dataset("digits", seed=s) for s in (0, 0, 1))
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])
    p, q = create_dataset("shapes3d", seed=3, train_size=24, val_size=12, test_size=12), \
        create_dataset("shapes3d", seed=3, train_size=24, val_size=12, test_size=12)
    assert torch.equal(p.train.tensors[0], q.train.tensors[0])


def test_idx_reader_round_trip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


def test_fashion_mnist_from_idx_files(fmnist_dir):
    s = create_dataset("fashion-mnist", root=str(fmnist_dir), seed=0, val_fraction=0.25)
    _check(s, 10)
    assert s.info.input_shape == (1, 28, 28)
    assert (len(s.train), len(s.val), len(s.test)) == (90, 30, 40)
    raw = read_idx(fmnist_dir / "t10k-images-idx3-ubyte.gz")
    expect = (raw[0] / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(s.test[0][0][0].numpy(), expect, atol=1e-5)
    pts = create_dataset("fashion-mnist-points", root=str(fmnist_dir), num_points=64)
    _check(pts, 10)
    assert pts.info.input_shape == (3, 64)
    xyz = pts.test.tensors[0]
    assert xyz[:, :2].abs().max() <= 1.0 and xyz[:, 2].min() > 0.1  # (x, y) in [-1, 1], intensity above threshold


def test_fashion_mnist_train_size_is_a_fixed_balanced_subset(fmnist_dir):
    full = read_idx(fmnist_dir / "train-labels-idx1-ubyte.gz")
    a, b = (create_dataset("fashion-mnist", root=str(fmnist_dir), seed=s, val_fraction=0.25, train_size=40)
            for s in (0, 1))
    for s in (a, b):
        ys = torch.cat([s.train.tensors[1], s.val.tensors[1]]).numpy()
        assert len(ys) == 40 and np.bincount(ys, minlength=10).tolist() == [4] * 10
    imgs = lambda s: {tuple(x.flatten().tolist()) for x in torch.cat([s.train.tensors[0], s.val.tensors[0]])}  # noqa: E731
    assert imgs(a) == imgs(b)  # the same images for every seed; only the val hold-out differs
    assert len(full) == 120 and len(a.test) == 40
    with pytest.raises(ValueError, match="train_size must be in 10..120"):
        create_dataset("fashion-mnist", root=str(fmnist_dir), train_size=500)


def test_fashion_mnist_missing_dir_names_it(tmp_path):
    with pytest.raises(DataNotFoundError, match="dataset-fashion-mnist"):
        create_dataset("fashion-mnist", root=str(tmp_path / "nowhere"))


def _write_cifar(d, n_train_per_batch, n_test, hundred=False):
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    key = "fine_labels" if hundred else "labels"
    ncls = 100 if hundred else 10

    def dump(name, n):
        with open(d / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         key: (np.arange(n) % ncls).tolist()}, f)

    if hundred:
        dump("train", n_train_per_batch * 5)
        dump("test", n_test)
    else:
        for i in range(1, 6):
            dump(f"data_batch_{i}", n_train_per_batch)
        dump("test_batch", n_test)


def test_cifar_readers_on_written_pickles(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py", 20, 30)
    _write_cifar(tmp_path / "cifar-100-python", 40, 200, hundred=True)
    s = create_dataset("cifar10", root=str(tmp_path), seed=0, augment=False)
    _check(s, 10)
    assert s.info.input_shape == (3, 32, 32) and len(s.train) + len(s.val) == 100 and len(s.test) == 30
    x, _ = read_cifar(tmp_path / "cifar-10-batches-py", train=False)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f)["data"]
    np.testing.assert_array_equal(x.reshape(30, -1), raw)  # channel-major layout kept
    s100 = create_dataset("cifar100", root=str(tmp_path), seed=0)  # with augmentation
    assert s100.info.num_classes == 100
    x0, _ = s100.train[0]
    assert x0.shape == (3, 32, 32)


def test_torchvision_cifar_rejects_files_it_did_not_download(tmp_path):
    """Why nas-split reads the pickles itself: torchvision checks MD5 sums, so it cannot load test-sized files."""
    import torchvision

    _write_cifar(tmp_path / "cifar-10-batches-py", 4, 4)
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        torchvision.datasets.CIFAR10(str(tmp_path), train=True, download=False)


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(DataNotFoundError, match="download"):
        create_dataset("cifar10", root=str(tmp_path))


def test_modelnet40_from_hdf5_files(tmp_path):
    import h5py

    rng = np.random.default_rng(0)
    for name, n in (("ply_data_train0.h5", 60), ("ply_data_train1.h5", 40), ("ply_data_test0.h5", 30)):
        with h5py.File(tmp_path / name, "w") as h:
            h["data"] = rng.normal(size=(n, 100, 3)).astype(np.float32) * 5 + 2
            h["label"] = (np.arange(n) % 40).astype(np.uint8)[:, None]
    s = create_dataset("modelnet40", root=str(tmp_path), num_points=64, seed=0)
    _check(s, 40)
    assert s.info.input_shape == (3, 64) and len(s.train) + len(s.val) == 100 and len(s.test) == 30
    pts = s.test.tensors[0]
    norms = pts.norm(dim=1)
    assert torch.allclose(norms.amax(dim=1), torch.ones(30), atol=1e-5)  # scaled into the unit ball
    assert pts.mean(dim=2).abs().max() < 1e-5  # centred


def test_shapes3d_classes_and_points():
    s = create_dataset("shapes3d", seed=0, num_points=128, train_size=48, val_size=24, test_size=24)
    labels = _check(s, len(SHAPES))
    assert len(SHAPES) >= 10 and set(labels.tolist()) == set(range(len(SHAPES)))
    x = s.train.tensors[0]
    assert x.shape[1:] == (3, 128) and x.mean(dim=2).abs().max() < 1e-4  # centred clouds
    radius = x.norm(dim=1).amax(dim=1)
    assert radius.min() > 0.3 and radius.max() < 3.0  # random scale, no degenerate clouds


def test_digits_points_view():
    s = create_dataset("digits-points", num_points=32)
    _check(s, 10)
    assert s.info.kind == "points" and s.info.input_shape == (3, 32)
