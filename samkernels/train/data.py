"""Data sets held in memory as tensors, a seeded batch iterator and image augmentation.

* ``mnist1d``  - generated locally by the ``mnist1d`` package (4000 train / 1000 test, 40 features);
* ``digits``   - scikit-learn's 8x8 digits (1797 images, fixed stratified 80/20 split);
* ``mnist``, ``fashionmnist``, ``cifar10``, ``cifar100`` - read from ``data_dir`` in the layout
  ``torchvision.datasets`` downloads (``MNIST/raw/*-ubyte[.gz]``, ``FashionMNIST/raw/...``,
  ``cifar-10-batches-py/``, ``cifar-100-python/``).  Reading needs no torchvision; ``download=True``
  does (it calls ``torchvision.datasets.<Name>(root, download=True)``).  Missing files are an error,
  never a silent switch to another data set.

Images are scaled to [0, 1] and standardised per channel with the training set's mean and std.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import os
import pickle
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from samkernels.train.config import ConfigError

TORCHVISION_SETS = {  # name -> (torchvision class, folder of the torchvision layout)
    "mnist": ("MNIST", "MNIST"),
    "fashionmnist": ("FashionMNIST", "FashionMNIST"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", "cifar-100-python"),
}
DATASETS = ("mnist1d", "digits") + tuple(TORCHVISION_SETS)


class DataError(RuntimeError):
    """A data set cannot be loaded (missing files, missing optional package)."""


VAL_SEED = 0  # the validation split's permutation (fixed: the same split for every run seed)


@dataclass
class DataSet:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    image: bool          # (C, H, W) examples: random-crop augmentation applies
    flip: bool           # horizontal flips keep the label (CIFAR), not for digits
    x_val: Optional[Tensor] = None   # validation split carved from the training data
    y_val: Optional[Tensor] = None   # (split_validation); None: no validation split

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def subset(self, train: Optional[int], test: Optional[int]) -> "DataSet":
        """The first ``train`` / ``test`` examples (None keeps all); used for quick runs and tests."""
        sl = lambda n: slice(None) if n is None else slice(0, n)  # noqa: E731
        if self.x_val is not None:
            raise ValueError("subset() before split_validation()")
        return DataSet(self.name, self.x_train[sl(train)], self.y_train[sl(train)],
                       self.x_test[sl(test)], self.y_test[sl(test)], self.num_classes, self.image,
                       self.flip)

    def split_validation(self, fraction: float, seed: int = VAL_SEED) -> "DataSet":
        """Move ``round(fraction * n_train)`` training examples (at least one when fraction > 0),
        chosen by a permutation from ``seed``, into a validation split; the rest stay training
        data in their original order.  The split does not depend on the run's seed: every seed and
        optimizer trains and validates on the same examples.  ``fraction == 0``: no split."""
        if not 0 <= fraction < 1:
            raise ValueError(f"validation fraction must be in [0, 1), got {fraction!r}")
        if fraction == 0:
            return self
        n = self.x_train.shape[0]
        n_val = max(1, round(fraction * n))
        if n_val >= n:
            raise ValueError(f"a validation split of {n_val} leaves no training data (n = {n})")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        val = perm[:n_val].to(self.x_train.device)
        train = perm[n_val:].sort().values.to(self.x_train.device)
        return DataSet(self.name, self.x_train[train], self.y_train[train], self.x_test,
                       self.y_test, self.num_classes, self.image, self.flip,
                       self.x_train[val], self.y_train[val])

    def to(self, device) -> "DataSet":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return DataSet(self.name, self.x_train.to(device), self.y_train.to(device),
                       self.x_test.to(device), self.y_test.to(device), self.num_classes, self.image,
                       self.flip, move(self.x_val), move(self.y_val))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_dataset(name: str, data_dir: Optional[str] = None, download: bool = False) -> DataSet:
    name = name.lower().replace("-", "").replace("_", "")
    if name == "mnist1d":
        return _mnist1d()
    if name == "digits":
        return _digits()
    if name in TORCHVISION_SETS:
        return _image_set(name, data_dir, download)
    raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


def cache_dir() -> str:
    """Where generated data sets are cached: $SAMKERNELS_CACHE or ~/.cache/samkernels."""
    return os.environ.get("SAMKERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "samkernels")


@functools.lru_cache(maxsize=1)
def _mnist1d() -> DataSet:
    try:
        import mnist1d
        import mnist1d.data as m1d
    except ImportError as err:
        raise DataError("data set 'mnist1d' needs the mnist1d package: pip install mnist1d") from err
    args = m1d.get_dataset_args(as_dict=True)
    tag = hashlib.sha1(repr(sorted((k, v) for k, v in args.items() if k != "url")).encode())
    try:
        version = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        version = getattr(mnist1d, "__version__", "0")
    path = os.path.join(cache_dir(), f"mnist1d-{version}-{tag.hexdigest()[:12]}.npz")
    try:  # generation takes seconds; reuse an earlier one
        with np.load(path) as z:
            d = {k: z[k] for k in ("x", "y", "x_test", "y_test")}
    except (OSError, KeyError, ValueError):
        state = np.random.get_state()  # make_dataset reseeds numpy's global RNG; keep the caller's
        try:
            d = m1d.make_dataset(m1d.get_dataset_args())
        finally:
            np.random.set_state(state)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + f".{os.getpid()}.tmp.npz"
            np.savez(tmp, **{k: d[k] for k in ("x", "y", "x_test", "y_test")})
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home only costs the regeneration next time
    f = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    l = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    return DataSet("mnist1d", f(d["x"]), l(d["y"]), f(d["x_test"]), l(d["y_test"]), 10,
                   image=False, flip=False)


@functools.lru_cache(maxsize=1)
def _digits() -> DataSet:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise DataError("data set 'digits' needs scikit-learn: pip install scikit-learn") from err
    d = load_digits()
    x = d.images.astype(np.float32)[:, None] / 16.0  # (n, 1, 8, 8) in [0, 1]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.2, stratify=d.target,
                                          random_state=0)
    xtr, xte = _standardise(torch.as_tensor(xtr), torch.as_tensor(xte))
    return DataSet("digits", xtr, torch.as_tensor(ytr), xte, torch.as_tensor(yte), 10,
                   image=True, flip=False)


def _standardise(xtr: Tensor, xte: Tensor):
    """Per-channel standardisation with training-set statistics ((n, C, H, W) tensors)."""
    dims = (0, 2, 3)
    mean, std = xtr.mean(dims, keepdim=True), xtr.std(dims, keepdim=True).clamp_min(1e-8)
    return (xtr - mean) / std, (xte - mean) / std


def _image_set(name: str, data_dir: Optional[str], download: bool) -> DataSet:
    cls_name, folder = TORCHVISION_SETS[name]
    if not data_dir:
        raise DataError(f"data set {name!r} is read from disk: pass --data-dir DIR holding "
                        f"{folder}/ (the layout torchvision.datasets.{cls_name} downloads)")
    if download:
        _download(cls_name, data_dir)
    if name in ("mnist", "fashionmnist"):
        xtr, ytr, xte, yte = _read_mnist(data_dir, folder)
        classes, flip = 10, False
    else:
        xtr, ytr, xte, yte = _read_cifar(data_dir, folder, name == "cifar100")
        classes, flip = (100 if name == "cifar100" else 10), True
    xtr, xte = _standardise(xtr.float() / 255.0, xte.float() / 255.0)
    return DataSet(name, xtr, ytr, xte, yte, classes, image=True, flip=flip)


def _download(cls_name: str, data_dir: str) -> None:
    try:
        import torchvision.datasets as tvd
    except Exception as err:  # ImportError, or a torchvision built for another torch
        raise DataError(f"--download needs torchvision, which cannot be imported here ({err}); "
                        f"download {cls_name} elsewhere and pass its folder with --data-dir") from err
    for train in (True, False):
        getattr(tvd, cls_name)(data_dir, train=train, download=True)


def _find(data_dir: str, folder: str, stem: str) -> str:
    """Path of ``stem`` (or ``stem.gz``) in DIR/folder/raw, DIR/folder or DIR; clear error if absent."""
    places = [os.path.join(data_dir, folder, "raw"), os.path.join(data_dir, folder), data_dir]
    for place in places:
        for name in (stem, stem + ".gz"):
            if os.path.isfile(os.path.join(place, name)):
                return os.path.join(place, name)
    raise DataError(f"{stem} not found under {data_dir!r} (looked in {', '.join(places)}); "
                    f"torchvision.datasets.{folder}(root, download=True) creates this layout, "
                    f"or run with --download where torchvision is installed")


def _read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian magic, dims, then uint8 data."""
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(dims))


def _read_mnist(data_dir: str, folder: str):
    arrays = [_read_idx(_find(data_dir, folder, stem)) for stem in
              ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    xtr, ytr, xte, yte = (torch.as_tensor(a.copy()) for a in arrays)
    return xtr[:, None], ytr.long(), xte[:, None], yte.long()


def _read_cifar(data_dir: str, folder: str, hundred: bool):
    key = "fine_labels" if hundred else "labels"
    train_files = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]

    def load(stems):
        xs, ys = [], []
        for stem in stems:
            with open(_find(data_dir, folder, stem), "rb") as fh:
                batch = pickle.load(fh, encoding="latin1")
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[key], dtype=np.int64))
        return torch.as_tensor(np.concatenate(xs)), torch.as_tensor(np.concatenate(ys))

    xtr, ytr = load(train_files)
    xte, yte = load(["test" if hundred else "test_batch"])
    return xtr, ytr, xte, yte


# --------------------------------------------------------------------------------------------
# Batches and augmentation
# --------------------------------------------------------------------------------------------
def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator fixed by (seed, epoch, stream): shuffling and augmentation of an epoch can be
    reproduced after a resume without saving any generator state."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 7 + stream)


def train_batches(data: DataSet, batch_size: int, seed: int, epoch: int,
                  augment: bool = False) -> Iterator[Tuple[Tensor, Tensor]]:
    """Shuffled full batches of one epoch (the last partial batch is dropped)."""
    n = data.x_train.shape[0]
    if n < batch_size:
        raise ConfigError(f"batch size {batch_size} exceeds the {n} training examples")
    perm = torch.randperm(n, generator=epoch_generator(seed, epoch)).to(data.x_train.device)
    aug_gen = epoch_generator(seed, epoch, stream=1)
    for start in range(0, n - batch_size + 1, batch_size):
        idx = perm[start:start + batch_size]
        x = data.x_train[idx]
        if augment:
            x = random_crop_flip(x, aug_gen, flip=data.flip)
        yield x, data.y_train[idx]


def steps_per_epoch(data: DataSet, batch_size: int) -> int:
    return data.x_train.shape[0] // batch_size


def random_crop_flip(x: Tensor, gen: torch.Generator, pad: int = 4, flip: bool = True) -> Tensor:
    """Random ``pad``-pixel-padded crops (zero padding) and, if ``flip``, horizontal flips of a batch
    (n, C, H, W); random numbers come from the CPU generator ``gen``."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (n, 1, h, 1)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (n, 1, 1, w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[batch, chan, rows, cols]
    if flip:
        mirror = (torch.rand(n, generator=gen) < 0.5).to(x.device)[:, None, None, None]
        out = torch.where(mirror, out.flip(3), out)
    return out
