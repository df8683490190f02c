"""Data sources: the embedded digits, real sets from ``../shared/data``, ``.npz`` files and
image folders.

A source is one of

- ``"<set>:<part>"``, a named set (``digits:test``, ``mnist:train``, ``usps:train``);
- a path to an ``.npz`` file with these keys (any other key is ignored):

  ``x``, required
      (N, C, H, W) or (N, H, W) images (a missing channel axis means one channel), dtype
      uint8 (0..255, divided by 255) or floating with every value in [0, 1]. Any other dtype,
      and a floating ``x`` with values outside [0, 1] (NaN and infinity included), is an error:
      nothing is rescaled silently.
  ``y``, optional
      (N,) integer class indices in 0..K-1.
  ``class_names``, optional
      (K,) strings in label order; by default ``"0"`` .. ``"K-1"`` with K one more than
      ``y``'s largest index.

- a path to a folder in torchvision's ``ImageFolder`` layout, ``<folder>/<class>/<image>``:
  the classes are the sorted names of the subfolders (hidden ones skipped) and the images are
  the files below each with the extensions of :data:`IMAGE_EXTENSIONS`, case-insensitive. All
  images get the channel count of the majority (1 where most are grayscale, else 3) and the
  size of the first image (the others are resized bilinearly, antialiased).

Images come back as float32 in [0, 1]. Nothing is ever downloaded: a set whose files are absent
raises :class:`SourceUnavailable`. :func:`check_source` finds what would stop a source from
loading without loading it.

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

from amalgam.fusion.imagefiles import image_files, npz_layout, read_image_folder, read_npz

DIGIT_NAMES = [str(d) for d in range(10)]
DIGITS_SEED = 0
DIGITS_PRIVATE_SHARDS = 3
DIGITS_PARTS = (*(f"private-{i}" for i in range(DIGITS_PRIVATE_SHARDS)), "public", "train", "test")


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


def _absent(path: Path) -> str:
    return f"{path} not found (set AMALGAM_DATA to the shared data folder)"


def _require(path: Path) -> Path:
    if not path.exists():
        raise SourceUnavailable(_absent(path))
    return path


@dataclass(frozen=True)
class NamedSet:
    """A named set: its loader and, for each part, the files it reads (relative to
    :func:`shared_data_dir`; none for the embedded digits)."""

    load: Callable[[str], Dataset]
    files: dict[str, tuple[str, ...]]


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


def _digits() -> NamedSet:
    return NamedSet(
        lambda part: _digits_all().subset(_digits_parts()[part]),
        {part: () for part in DIGITS_PARTS},
    )


def _read_idx_pair(images: str, labels: str, names: list[str]) -> Dataset:
    images_path, labels_path = (_require(shared_data_dir() / f) for f in (images, labels))
    x = torch.from_numpy(_read_idx(images_path).copy()).float().div_(255).unsqueeze(1)
    y = torch.from_numpy(_read_idx(labels_path).astype(np.int64))
    return Dataset(x, y, names)  # x (N, 1, H, W)


def _idx_set(folder: str, files: dict[str, tuple[str, str]], names: list[str]) -> NamedSet:
    paths = {
        part: (f"{folder}/{images}", f"{folder}/{labels}")
        for part, (images, labels) in files.items()
    }
    return NamedSet(lambda part: _read_idx_pair(*paths[part], names), paths)


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


SPLIT_SEED = 0  # fixed: the train / test split of sets that ship as one file


def _split_idx_set(
    folder: str, files: tuple[str, str], names: list[str], extra: dict[str, tuple[str, str]]
) -> NamedSet:
    """A set shipped as one IDX pair, split once with a fixed seed: 80% ``train``, 20%
    ``test``; ``extra`` maps further part names to their own IDX pairs."""
    whole = tuple(f"{folder}/{name}" for name in files)
    paths = {"train": whole, "test": whole}
    paths.update({part: tuple(f"{folder}/{name}" for name in pair) for part, pair in extra.items()})

    def load(part: str) -> Dataset:
        data = _read_idx_pair(*paths[part], names)
        if part in extra:
            return data
        order = np.random.default_rng(SPLIT_SEED).permutation(len(data))
        cut = int(0.8 * len(data))
        return data.subset(np.sort(order[:cut] if part == "train" else order[cut:]))

    return NamedSet(load, paths)


def _usps(part: str) -> Dataset:
    """USPS 16x16 digits placed like MNIST: scaled to 20x20 and padded to 28x28."""
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


SOURCES: dict[str, NamedSet] = {
    "digits": _digits(),
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
    "usps": NamedSet(_usps, {part: ("usps/usps.npz",) for part in ("train", "test")}),
    "cifar10": NamedSet(
        _cifar10,
        {
            "train": ("cifar10/cifar10_jpeg.npz",),
            "test": ("cifar10/cifar10_jpeg.npz", "cifar10/cifar10_test_uint8.npz"),
        },
    ),
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


def _named(source: str) -> tuple[NamedSet, str]:
    """The named set and part of ``"<set>:<part>"``; ValueError for an unknown set or part."""
    name, _, part = source.partition(":")
    if name not in SOURCES or not part:
        if "/" in source or os.sep in source:
            raise ValueError(f"{source}: no such folder")
        raise ValueError(
            f"unknown data source {source!r}; use <set>:<part> with set one of "
            f"{', '.join(SOURCES)}, a path to an .npz file, or a path to an image folder "
            "(<folder>/<class>/<image>)"
        )
    named = SOURCES[name]
    if part not in named.files:
        raise ValueError(f"{name} has no part {part!r}; parts: {', '.join(named.files)}")
    return named, part


def load_source(source: str) -> Dataset:
    """Load a data source (see the module docstring).

    Parameters
    ----------
    source
        A path to an image folder, a path ending in ``.npz``, or ``"<set>:<part>"``.

    Raises
    ------
    SourceUnavailable
        A named set whose files are absent.
    ValueError
        An unknown source, set or part, or a file or folder that cannot be read as data (one
        line naming it and the problem).
    """
    path = Path(source)
    if path.is_dir():
        return Dataset(*read_image_folder(path))
    if source.endswith(".npz"):
        return Dataset(*read_npz(path))
    named, part = _named(source)
    return named.load(part)


def check_source(source: str) -> str | None:
    """What would stop :func:`load_source` from loading ``source``, found without loading it.

    Catches an unknown set or part, a named set whose files are absent, an ``.npz`` file that
    is missing or whose arrays have a refused key layout, dtype or shape (read from the archive's
    headers), and a folder that is missing or holds no images. Pixel values, label values and
    undecodable image files are only found by :func:`load_source`.

    Returns
    -------
    str or None
        The problem, one line, or None.
    """
    path = Path(source)
    try:
        if path.is_dir():
            image_files(path)
        elif source.endswith(".npz"):
            npz_layout(path)
        else:
            named, part = _named(source)
            absent = (
                p for p in (shared_data_dir() / f for f in named.files[part]) if not p.exists()
            )
            missing = next(absent, None)
            if missing is not None:
                return _absent(missing)
    except ValueError as error:
        return str(error)
    return None


def fit_to_shape(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Resize (N, C, H, W) images to ``shape = (C', H', W')``: bilinear in space, channels
    repeated (1 -> C') or averaged (C -> 1)."""
    c, h, w = shape
    if x.shape[1] != c:
        x = x.mean(dim=1, keepdim=True) if c == 1 else x.expand(-1, c, -1, -1)
    if tuple(x.shape[2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.contiguous()
