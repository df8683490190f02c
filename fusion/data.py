"""Data sources by name: the embedded digits, real sets from ``../shared/data``, or ``.npz`` files.

A source is ``"<set>:<part>"`` (``digits:test``, ``mnist:train``, ``usps:train``) or a path to an
``.npz`` file with ``x`` (N, C, H, W) or (N, H, W) and optionally ``y`` and ``class_names``.
Images come back as float32 in [0, 1]. Nothing is ever downloaded: a set whose files are absent
raises :class:`SourceUnavailable`.

The embedded digits (scikit-learn's ``load_digits``, 1,797 8x8 images) are split once, with a
fixed seed: 30% ``test``, and the rest into three private shards (``private-0..2``, what the
demo's parties train on) and a ``public`` pool that the coordinator may use as unlabeled data.
``notmnist`` (letters A-J) and ``kannada`` (the Kannada-MNIST test file; ``kannada:dig`` is
Dig-MNIST) ship as one file each and are split the same way: 80% ``train``, 20% ``test``.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DIGIT_NAMES = [str(d) for d in range(10)]
DIGITS_SEED = 0
DIGITS_PRIVATE_SHARDS = 3


class SourceUnavailable(RuntimeError):
    """A named data set whose files are not on this machine."""


@dataclass(frozen=True)
class Dataset:
    x: Tensor  # (N, C, H, W) float32 in [0, 1]
    y: Tensor | None  # (N,) int64 indices into class_names, or None when unlabeled
    class_names: list[str]

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, index: Tensor | np.ndarray) -> Dataset:
        index = torch.as_tensor(index, dtype=torch.long)
        return Dataset(self.x[index], None if self.y is None else self.y[index], self.class_names)

    def restrict(self, class_names: list[str]) -> Dataset:
        """Only the samples of the given classes, relabelled to indices into ``class_names``."""
        if self.y is None:
            raise ValueError("cannot restrict an unlabeled data set to classes")
        mapping = torch.full((len(self.class_names),), -1, dtype=torch.long)
        for i, name in enumerate(class_names):
            mapping[self.class_names.index(name)] = i
        new_y = mapping[self.y]
        keep = new_y >= 0
        return Dataset(self.x[keep], new_y[keep], list(class_names))


def shared_data_dir() -> Path:
    """``$AMALGAM_DATA``, else ``shared/data`` beside the repository."""
    env = os.environ.get("AMALGAM_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _read_idx(path: Path) -> np.ndarray:
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _require(path: Path) -> Path:
    if not path.exists():
        raise SourceUnavailable(f"{path} not found (set AMALGAM_DATA to the shared data folder)")
    return path


@cache
def _digits_all() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    return Dataset(x, torch.tensor(bunch.target, dtype=torch.long), DIGIT_NAMES)


@cache
def _digits_parts() -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    y = _digits_all().y.numpy()
    train, test = train_test_split(
        np.arange(len(y)), test_size=0.3, random_state=DIGITS_SEED, stratify=y
    )
    rng = np.random.default_rng(DIGITS_SEED)
    train = rng.permutation(train)
    parts = np.array_split(train, DIGITS_PRIVATE_SHARDS + 1)
    named = {f"private-{i}": parts[i] for i in range(DIGITS_PRIVATE_SHARDS)}
    named.update(public=parts[-1], train=train, test=test)
    return named


def _digits(part: str) -> Dataset:
    parts = _digits_parts()
    if part not in parts:
        raise ValueError(f"digits has no part {part!r}; parts: {', '.join(parts)}")
    return _digits_all().subset(parts[part])


def _idx_set(folder: str, files: dict[str, tuple[str, str]], names: list[str]):
    def load(part: str) -> Dataset:
        if part not in files:
            raise ValueError(f"{folder} has no part {part!r}; parts: {', '.join(files)}")
        root = shared_data_dir() / folder
        images, labels = (_require(root / name) for name in files[part])
        x = torch.from_numpy(_read_idx(images).copy()).float().div_(255).unsqueeze(1)
        y = torch.from_numpy(_read_idx(labels).astype(np.int64))
        return Dataset(x, y, names)

    return load


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


SPLIT_SEED = 0  # fixed: the train / test split of sets that ship as one file


def _split_idx_set(folder: str, files: tuple[str, str], names: list[str], extra: dict):
    """A set shipped as one IDX pair, split once with a fixed seed: 80% ``train``, 20%
    ``test``; ``extra`` maps further part names to their own IDX pairs."""
    whole = _idx_set(folder, {"all": files, **extra}, names)

    def load(part: str) -> Dataset:
        if part in extra:
            return whole(part)
        if part not in ("train", "test"):
            parts = ", ".join(["train", "test", *extra])
            raise ValueError(f"{folder} has no part {part!r}; parts: {parts}")
        data = whole("all")
        order = np.random.default_rng(SPLIT_SEED).permutation(len(data))
        cut = int(0.8 * len(data))
        return data.subset(np.sort(order[:cut] if part == "train" else order[cut:]))

    return load


def _usps(part: str) -> Dataset:
    """USPS 16x16 digits placed like MNIST: scaled to 20x20 and padded to 28x28."""
    if part not in ("train", "test"):
        raise ValueError(f"usps has no part {part!r}; parts: train, test")
    with np.load(_require(shared_data_dir() / "usps" / "usps.npz")) as f:
        x = torch.from_numpy(f[f"x_{part}"].astype(np.float32)).reshape(-1, 1, 16, 16)
        y = torch.from_numpy(f[f"y_{part}"].astype(np.int64)).reshape(-1)
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False).clamp(0, 1)
    return Dataset(F.pad(x, (4, 4, 4, 4)), y, DIGIT_NAMES)  # (N, 1, 20, 20) -> (N, 1, 28, 28)


def cache_dir() -> Path:
    """``$AMALGAM_CACHE``, else ``~/.cache/amalgam``: derived files worth keeping."""
    return Path(os.environ.get("AMALGAM_CACHE") or Path.home() / ".cache" / "amalgam")


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) uint8 images from concatenated JPEG bytes."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = torch.from_numpy(blob)
    images = [
        decode_jpeg(data[offsets[i] : offsets[i + 1]], mode=ImageReadMode.RGB)
        for i in range(len(offsets) - 1)
    ]  # each (3, 32, 32)
    return torch.stack(images).permute(0, 2, 3, 1).numpy()


def _cifar10(part: str) -> Dataset:
    """CIFAR-10 from ``cifar10/``: the test set decoded as shipped; the training set's JPEGs
    decoded once (about a minute) and cached under :func:`cache_dir`."""
    if part not in ("train", "test"):
        raise ValueError(f"cifar10 has no part {part!r}; parts: train, test")
    folder = shared_data_dir() / "cifar10"
    with np.load(_require(folder / "cifar10_jpeg.npz")) as f:
        names = [str(n) for n in f["classes"]]
        labels = f[f"{part}_labels"].astype(np.int64)
        if part == "test":
            with np.load(_require(folder / "cifar10_test_uint8.npz")) as t:
                pixels = t["x"]
        else:
            cached = cache_dir() / "cifar10_train_uint8.npy"
            if cached.exists():
                pixels = np.load(cached)
            else:
                pixels = _decode_jpegs(f["train_jpeg"], f["train_offsets"])
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.save(cached, pixels)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255)  # (N, 3, 32, 32)
    return Dataset(x.contiguous(), torch.from_numpy(labels), names)


SOURCES: dict[str, Callable[[str], Dataset]] = {
    "digits": _digits,
    "mnist": _idx_set("mnist", _MNIST_FILES, DIGIT_NAMES),
    "fashion_mnist": _idx_set(
        "fashion_mnist",
        _MNIST_FILES,
        [
            "t-shirt",
            "trouser",
            "pullover",
            "dress",
            "coat",
            "sandal",
            "shirt",
            "sneaker",
            "bag",
            "boot",
        ],
    ),
    "usps": _usps,
    "cifar10": _cifar10,
    "notmnist": _split_idx_set(
        "notmnist",
        ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
        list("ABCDEFGHIJ"),
        {},
    ),
    "kannada": _split_idx_set(
        "kannada_mnist",
        ("X_kannada_MNIST_test-idx3-ubyte.gz", "y_kannada_MNIST_test-idx1-ubyte.gz"),
        DIGIT_NAMES,
        {"dig": ("X_dig_MNIST-idx3-ubyte.gz", "y_dig_MNIST-idx1-ubyte.gz")},
    ),
}


def _npz(path: Path) -> Dataset:
    with np.load(_require(path), allow_pickle=False) as f:
        if "x" not in f:
            raise ValueError(f"{path}: no array 'x'")
        x = torch.from_numpy(f["x"].astype(np.float32))
        y = torch.from_numpy(f["y"].astype(np.int64)) if "y" in f else None
        names = [str(n) for n in f["class_names"]] if "class_names" in f else None
    if x.ndim == 3:
        x = x.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    if x.max() > 1:
        x = x / 255.0
    if names is None:
        names = [str(i) for i in range(int(y.max()) + 1)] if y is not None else []
    return Dataset(x, y, names)


def load_source(source: str) -> Dataset:
    """Load a named source (``set:part``) or an ``.npz`` path."""
    if source.endswith(".npz"):
        return _npz(Path(source))
    name, _, part = source.partition(":")
    if name not in SOURCES or not part:
        raise ValueError(
            f"unknown data source {source!r}; use <set>:<part> with set one of "
            f"{', '.join(SOURCES)}, or a path to an .npz file"
        )
    return SOURCES[name](part)


def fit_to_shape(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Resize (N, C, H, W) images to ``shape = (C', H', W')``: bilinear in space, channels
    repeated (1 -> C') or averaged (C -> 1)."""
    c, h, w = shape
    if x.shape[1] != c:
        x = x.mean(dim=1, keepdim=True) if c == 1 else x.expand(-1, c, -1, -1)
    if tuple(x.shape[2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.contiguous()
