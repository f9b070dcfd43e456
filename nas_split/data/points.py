"""Point-cloud datasets: ModelNet40 (HDF5 release), procedural ``shapes3d``, and point views of image datasets.

Every sample is ``(C, N)``: ``C`` features per point (xyz, or (x, y, intensity) for image views), ``N`` points.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._partition import partition_indices, tensor_dataset
from ._registry import DataNotFoundError, DatasetInfo, DataSplits, register_dataset

__all__ = ["SHAPES", "read_modelnet40", "sample_shape", "image_to_points"]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True).clip(1e-12)


def _triangles(rng: np.random.Generator, tris: np.ndarray, m: int) -> np.ndarray:
    """``m`` points uniform on the union of triangles ``tris`` (T, 3, 3), area-weighted."""
    area = 0.5 * np.linalg.norm(np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]), axis=1)
    t = tris[rng.choice(len(tris), m, p=area / area.sum())]
    u, v = rng.random((2, m, 1))
    flip = (u + v) > 1
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    return t[:, 0] + u * (t[:, 1] - t[:, 0]) + v * (t[:, 2] - t[:, 0])


def _disk(rng, m, r0=0.0, r1=1.0, z=0.0):
    r = np.sqrt(rng.uniform(r0 ** 2, r1 ** 2, m))
    a = rng.uniform(0, 2 * np.pi, m)
    return np.stack([r * np.cos(a), r * np.sin(a), np.full(m, z)], 1)


def _sphere(rng, m):
    return _unit(rng.normal(size=(m, 3)))


def _cube(rng, m):
    p = rng.uniform(-1, 1, (m, 3))
    axis = rng.integers(0, 3, m)
    p[np.arange(m), axis] = rng.choice([-1.0, 1.0], m)
    return p


def _cylinder(rng, m):
    side = rng.random(m) < 2 / 3
    a = rng.uniform(0, 2 * np.pi, m)
    p = np.stack([np.cos(a), np.sin(a), rng.uniform(-1, 1, m)], 1)
    caps = _disk(rng, m, z=0.0)
    caps[:, 2] = rng.choice([-1.0, 1.0], m)
    return np.where(side[:, None], p, caps)


def _cone(rng, m):
    side = rng.random(m) < 0.7
    h = 1 - np.sqrt(rng.random(m))  # density proportional to the radius (1 - h)
    a = rng.uniform(0, 2 * np.pi, m)
    p = np.stack([(1 - h) * np.cos(a), (1 - h) * np.sin(a), 2 * h - 1], 1)
    return np.where(side[:, None], p, _disk(rng, m, z=-1.0))


def _torus(rng, m, big=1.0, small=0.35):
    u, v = rng.uniform(0, 2 * np.pi, (2, m))
    ring = big + small * np.cos(v)
    return np.stack([ring * np.cos(u), ring * np.sin(u), small * np.sin(v)], 1)


_SQ = np.array([[-1, -1, -1], [1, -1, -1], [1, 1, -1], [-1, 1, -1]], float)


def _pyramid(rng, m):
    apex = np.array([0.0, 0.0, 1.0])
    tris = [[_SQ[0], _SQ[1], _SQ[2]], [_SQ[0], _SQ[2], _SQ[3]]] + [[_SQ[i], _SQ[(i + 1) % 4], apex] for i in range(4)]
    return _triangles(rng, np.array(tris), m)


def _octahedron(rng, m):
    e = np.eye(3)
    tris = [[sx * e[0], sy * e[1], sz * e[2]] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]
    return _triangles(rng, np.array(tris, float), m)


def _ellipsoid(rng, m):
    return _sphere(rng, m) * np.array([1.0, 0.6, 0.35])


def _annulus(rng, m):
    return _disk(rng, m, r0=0.45)


def _helix(rng, m):
    t = rng.uniform(0, 4 * np.pi, m)
    return np.stack([np.cos(t), np.sin(t), t / (2 * np.pi) - 1], 1) + rng.normal(0, 0.05, (m, 3))


def _sheet(rng, m):
    return np.stack([rng.uniform(-1, 1, m), rng.uniform(-1, 1, m), np.zeros(m)], 1)


def _capsule(rng, m):
    side = rng.random(m) < 0.5
    a = rng.uniform(0, 2 * np.pi, m)
    body = np.stack([0.5 * np.cos(a), 0.5 * np.sin(a), rng.uniform(-0.5, 0.5, m)], 1)
    cap = 0.5 * _sphere(rng, m)
    cap[:, 2] += np.sign(cap[:, 2]) * 0.5
    return np.where(side[:, None], body, cap)


#: The procedural classes of ``shapes3d``, in label order.
SHAPES = {"sphere": _sphere, "cube": _cube, "cylinder": _cylinder, "cone": _cone, "torus": _torus,
          "pyramid": _pyramid, "octahedron": _octahedron, "ellipsoid": _ellipsoid, "annulus": _annulus,
          "helix": _helix, "sheet": _sheet, "capsule": _capsule}


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def sample_shape(rng: np.random.Generator, label: int, num_points: int, noise: float = 0.02) -> np.ndarray:
    """One ``(3, num_points)`` cloud of class ``label``: a random pose, isotropic scale in [0.6, 1.4], a random
    surface point count in [num_points / 2, 2 num_points] resampled to ``num_points``, Gaussian noise of std
    ``noise`` x U[0.5, 1.5]."""
    m = int(rng.integers(num_points // 2, 2 * num_points + 1))
    pts = list(SHAPES.values())[label](rng, max(m, 1))
    pts = pts[rng.choice(len(pts), num_points, replace=len(pts) < num_points)]
    pts = pts @ _rotation(rng).T * rng.uniform(0.6, 1.4)
    pts = pts + rng.normal(0, noise * rng.uniform(0.5, 1.5), pts.shape)
    return (pts - pts.mean(0)).T.astype(np.float32)


def _clouds(seed: int, n: int, num_points: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(SHAPES)
    x = np.stack([sample_shape(rng, int(c), num_points, noise) for c in y])
    return x, y.astype(np.int64)


_POINTS_NORM = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@register_dataset("shapes3d", f"procedural point clouds of {len(SHAPES)} shapes (sphere, cube, torus, ...)",
                  reads_files=False)
def shapes3d(seed: int = 0, root: str | None = None, num_points: int = 256, train_size: int = 1200,
             val_size: int = 240, test_size: int = 480, noise: float = 0.02) -> DataSplits:
    """Synthetic clouds; each split is generated from its own stream of ``seed`` (identical for equal seeds)."""
    parts = [_clouds(seed * 3 + k, n, num_points, noise) for k, n in enumerate((train_size, val_size, test_size))]
    info = DatasetInfo("shapes3d", "points", (3, num_points), len(SHAPES), *_POINTS_NORM)
    return DataSplits(info, *(tensor_dataset(x, y, *_POINTS_NORM) for x, y in parts))


def read_modelnet40(directory: str | os.PathLike, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read the HDF5 release (``ply_data_train*.h5`` / ``ply_data_test*.h5``, keys ``data`` (S, P, 3) and
    ``label`` (S, 1)): points ``(S, P, 3)`` float32 and labels ``(S,)``."""
    import h5py

    files = sorted(Path(directory).glob(f"ply_data_{'train' if train else 'test'}*.h5"))
    if not files:
        raise DataNotFoundError(f"no ply_data_{'train' if train else 'test'}*.h5 in {directory}")
    xs, ys = [], []
    for f in files:
        with h5py.File(f, "r") as h:
            xs.append(np.asarray(h["data"], dtype=np.float32))
            ys.append(np.asarray(h["label"], dtype=np.int64).reshape(-1))
    return np.concatenate(xs), np.concatenate(ys)


def _subsample(x: np.ndarray, num_points: int, rng: np.random.Generator) -> np.ndarray:
    """(S, P, 3) -> (S, 3, num_points): a random subset per shape, centred and scaled into the unit ball."""
    out = np.empty((len(x), 3, num_points), np.float32)
    for i, pts in enumerate(x):
        p = pts[rng.choice(len(pts), num_points, replace=len(pts) < num_points)]
        p = p - p.mean(0)
        out[i] = (p / max(np.linalg.norm(p, axis=1).max(), 1e-12)).T
    return out


@register_dataset("modelnet40", "ModelNet40, HDF5 release (modelnet40_ply_hdf5_2048), N points per shape")
def modelnet40(seed: int = 0, root: str | None = None, num_points: int = 1024, val_fraction: float = 0.1) -> DataSplits:
    """ModelNet40 from ``root`` (or ``$NAS_SPLIT_DATA[/modelnet40_ply_hdf5_2048]``); points subsampled by ``seed``."""
    base = root or os.environ.get("NAS_SPLIT_DATA")
    if base is None:
        raise DataNotFoundError("modelnet40 needs its HDF5 files: pass --data-dir DIR (with ply_data_*.h5) "
                                "or set NAS_SPLIT_DATA")
    d = Path(base)
    if not list(d.glob("ply_data_*.h5")) and (d / "modelnet40_ply_hdf5_2048").is_dir():
        d = d / "modelnet40_ply_hdf5_2048"
    rng = np.random.default_rng(seed)
    x_tr, y_tr = read_modelnet40(d, True)
    x_te, y_te = read_modelnet40(d, False)
    x_tr, x_te = _subsample(x_tr, num_points, rng), _subsample(x_te, num_points, rng)
    tr, va = partition_indices(y_tr, (1.0 - val_fraction,), seed)
    info = DatasetInfo("modelnet40", "points", (3, num_points), 40, *_POINTS_NORM)
    return DataSplits(info, tensor_dataset(x_tr[tr], y_tr[tr], *_POINTS_NORM),
                      tensor_dataset(x_tr[va], y_tr[va], *_POINTS_NORM), tensor_dataset(x_te, y_te, *_POINTS_NORM))


def image_to_points(images: np.ndarray, num_points: int, threshold: float, rng: np.random.Generator) -> np.ndarray:
    """Point views of images (as in PointNet++'s MNIST experiment): pixels above ``threshold`` become points
    (x, y, intensity) with x, y in [-1, 1]; ``num_points`` of them are sampled per image (with replacement when an
    image has fewer). ``images``: (S, 1, H, W) in [0, 1] -> (S, 3, num_points)."""
    s, _, h, w = images.shape
    ys, xs = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    out = np.empty((s, 3, num_points), np.float32)
    for i, img in enumerate(images[:, 0]):
        idx = np.flatnonzero(img > threshold)
        if idx.size == 0:
            idx = np.array([int(np.argmax(img))])
        pick = rng.choice(idx, num_points, replace=idx.size < num_points)
        out[i] = np.stack([xs.flat[pick], ys.flat[pick], img.flat[pick]])
    return out


def _point_view(name: str, splits: DataSplits, num_points: int, threshold: float, seed: int) -> DataSplits:
    rng = np.random.default_rng(seed)
    std = np.asarray(splits.info.std, np.float32)
    mean = np.asarray(splits.info.mean, np.float32)

    def view(ds):
        x, y = ds.tensors
        imgs = x.numpy() * std[0] + mean[0]  # undo the image normalisation
        return tensor_dataset(image_to_points(imgs, num_points, threshold, rng), y.numpy(), *_POINTS_NORM)

    info = DatasetInfo(name, "points", (3, num_points), splits.info.num_classes, *_POINTS_NORM)
    return DataSplits(info, view(splits.train), view(splits.val), view(splits.test))


@register_dataset("digits-points", "digits as point clouds: pixels above a threshold -> (x, y, intensity)",
                  reads_files=False)
def digits_points(seed: int = 0, root: str | None = None, num_points: int = 32, threshold: float = 0.25) -> DataSplits:
    """Point view of ``digits``."""
    from .images import digits

    return _point_view("digits-points", digits(seed=seed), num_points, threshold, seed)


@register_dataset("fashion-mnist-points", "Fashion-MNIST as point clouds: bright pixels -> (x, y, intensity)")
def fashion_mnist_points(seed: int = 0, root: str | None = None, num_points: int = 256,
                         threshold: float = 0.1) -> DataSplits:
    """Point view of ``fashion-mnist``."""
    from .images import fashion_mnist

    return _point_view("fashion-mnist-points", fashion_mnist(seed=seed, root=root), num_points, threshold, seed)
