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
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import data as torch_data

DIGIT_NAMES = [str(d) for d in range(10)]
DIGITS_SEED = 0
DIGITS_PRIVATE_SHARDS = 3
DIGITS_PARTS = (*(f"private-{i}" for i in range(DIGITS_PRIVATE_SHARDS)), "public", "train", "test")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PILLOW_EXTENSIONS = (".bmp", ".tif", ".tiff")  # formats torchvision.io cannot decode
FOLDER_WORKERS_FROM = 2000  # image folders larger than this are decoded by worker processes
FOLDER_WORKERS = 4  # at most this many, and no more than the CPUs
FOLDER_BATCH = 256  # images per decoding batch
NPZ_KEYS = ("x", "y", "class_names")


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


def _npz_layout(path: Path) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """The dtype and shape of each of :data:`NPZ_KEYS` that ``path`` holds, read from the
    archive's ``.npy`` headers without loading any array; ValueError (one line naming the file
    and the key) for a missing file or ``x``, or a dtype or shape that
    :func:`load_source` refuses."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz archive")
    layout = {}
    with zipfile.ZipFile(path) as archive:
        stored = set(archive.namelist())
        for key in (k for k in NPZ_KEYS if f"{k}.npy" in stored):
            with archive.open(f"{key}.npy") as header:
                version = np.lib.format.read_magic(header)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(header)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(header)
            layout[key] = dtype, shape
    _check_layout(path, layout)
    return layout


def _check_layout(path: Path, layout: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> None:
    if "x" not in layout:
        raise ValueError(f"{path}: no array 'x' (the images)")
    dtype, shape = layout["x"]
    if len(shape) not in (3, 4):
        raise ValueError(f"{path}: x has shape {shape}; expected (N, C, H, W) or (N, H, W)")
    if dtype.kind in "iu" and dtype != np.uint8:
        raise ValueError(f"{path}: x has dtype {dtype}; integer images must be uint8 (0..255)")
    if dtype != np.uint8 and dtype.kind != "f":
        raise ValueError(
            f"{path}: x has dtype {dtype}; expected uint8 (0..255) or floating in [0, 1]"
        )
    if "y" in layout:
        dtype, y_shape = layout["y"]
        if y_shape != shape[:1]:
            raise ValueError(
                f"{path}: y has shape {y_shape}; expected ({shape[0]},), one label per image of x"
            )
        if dtype.kind not in "iu":
            raise ValueError(f"{path}: y has dtype {dtype}; expected integer class indices")
    if "class_names" in layout:
        dtype, names_shape = layout["class_names"]
        if len(names_shape) != 1 or dtype.kind != "U":
            raise ValueError(
                f"{path}: class_names has dtype {dtype} and shape {names_shape}; "
                "expected (K,) strings"
            )


def _check_pixels(path: Path, x: np.ndarray) -> None:
    if x.dtype == np.uint8 or x.size == 0:
        return
    if not np.isfinite(x).all():
        raise ValueError(
            f"{path}: x holds NaN or infinite values; floating images must lie in [0, 1]"
        )
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 1:
        raise ValueError(
            f"{path}: x holds values in [{low:.4g}, {high:.4g}]; floating images must lie in "
            "[0, 1] (store 0..255 images as uint8)"
        )


def _check_labels(path: Path, y: np.ndarray, names: list[str] | None) -> None:
    if y.size == 0:
        return
    low, high = int(y.min()), int(y.max())
    if low < 0:
        raise ValueError(f"{path}: y holds class indices in [{low}, {high}]; they start at 0")
    if names is not None and high >= len(names):
        raise ValueError(
            f"{path}: y holds class indices in [{low}, {high}] but class_names has "
            f"{len(names)} names (indices 0..{len(names) - 1})"
        )


def _npz(path: Path) -> Dataset:
    """An ``.npz`` file's images, labels and class names.

    Keys (any other is ignored):

    ``x``, required
        (N, C, H, W) or (N, H, W) images (a missing channel axis means one channel), dtype
        uint8 (0..255, divided by 255) or floating with every value in [0, 1].
    ``y``, optional
        (N,) integer class indices in 0..K-1.
    ``class_names``, optional
        (K,) strings in label order; by default ``"0"`` .. ``"K-1"`` with K one more than
        ``y``'s largest index.

    Raises
    ------
    ValueError
        One line naming the file and the key: a missing file or ``x``, another dtype (an
        integer ``x`` other than uint8 included), a floating ``x`` with values outside [0, 1]
        (NaN and infinity included), a wrong number of axes, a ``y`` whose length differs from
        ``x``'s, or a ``y`` index outside the class names.
    """
    _npz_layout(path)
    with np.load(path, allow_pickle=False) as f:
        arrays = {key: f[key] for key in NPZ_KEYS if key in f}
    x, y = arrays["x"], arrays.get("y")
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else None
    _check_pixels(path, x)
    if y is not None:
        _check_labels(path, y, names)
    if names is None:
        names = [str(i) for i in range(int(y.max()) + 1)] if y is not None and y.size else []
    images = torch.from_numpy(x)
    images = images.float().div_(255) if x.dtype == np.uint8 else images.float()
    if images.ndim == 3:
        images = images.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    labels = None if y is None else torch.from_numpy(y.astype(np.int64))
    return Dataset(images, labels, names)


def _folder_problem(folder: Path, problem: str) -> ValueError:
    expected = ", ".join(IMAGE_EXTENSIONS)
    return ValueError(
        f"{folder}: {problem} (expected <class>/<image> files with extensions {expected})"
    )


def _image_files(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """The image files below ``folder``'s class subfolders, their class indices, and the class
    names (the sorted subfolder names); ValueError where there are no classes or no images."""
    classes = sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.is_dir() and not entry.name.startswith(".")
    )
    if not classes:
        raise _folder_problem(folder, "no class subfolders")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(
            p
            for p in (folder / name).rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        files += found
        labels += [label] * len(found)
    if not files:
        raise _folder_problem(folder, "no images")
    return files, labels, classes


def _decode(path: Path, channels: int, size: tuple[int, int] | None) -> Tensor:
    """One image file as (channels, H, W) uint8, resized to ``size`` (H, W) unless None."""
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2 import functional as TF

    if path.suffix.lower() in PILLOW_EXTENSIONS:
        from PIL import Image

        with Image.open(path) as opened:
            pixels = np.array(opened.convert("L" if channels == 1 else "RGB"))  # (H, W[, 3])
        image = torch.from_numpy(pixels).reshape(*pixels.shape[:2], -1).permute(2, 0, 1)
    else:
        mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        image = decode_image(read_file(str(path)), mode=mode)  # (C, H, W); (F, C, H, W) for a GIF
        if image.ndim == 4:
            image = image[0]  # an animated GIF's first frame
    image = TF.to_dtype(image, torch.uint8, scale=True)  # 16-bit PNGs
    if image.shape[0] != channels:  # GIF and WebP decode to RGB whatever the mode
        image = TF.rgb_to_grayscale(image[:3]) if channels == 1 else image[:1].expand(3, -1, -1)
    if size is not None and tuple(image.shape[1:]) != size:
        image = TF.resize(image, list(size), TF.InterpolationMode.BILINEAR, antialias=True)
    return image.contiguous()


def read_images(paths: Sequence[str | Path], shape: tuple[int, int, int]) -> Tensor:
    """Image files as (N, C, H, W) float32 in [0, 1], decoded with ``shape``'s C channels and
    resized to its (H, W); a missing or undecodable file raises ``ValueError`` naming it."""
    images = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        try:
            images.append(_decode(path, shape[0], tuple(shape[1:])))  # (C, H, W) uint8
        except (RuntimeError, OSError, ValueError) as error:
            raise ValueError(_cannot_decode(path, error)) from None
    return torch.stack(images).float().div_(255)


def _cannot_decode(path: Path, error: Exception) -> str:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    reason = re.sub(r"^.*\.cpp:\d+, ", "", lines[-1])  # torchvision's C++ source location
    return f"{path}: cannot decode as an image ({reason})"


class _ImageFiles(torch_data.Dataset):
    """Image files decoded to (channels, H, W) uint8, each with an empty string or, for a file
    that cannot be decoded, zeros and the one-line problem (a worker process's exception would
    reach the caller wrapped in a traceback)."""

    def __init__(self, paths: list[Path], channels: int, size: tuple[int, int]):
        self.paths, self.channels, self.size = paths, channels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        path = self.paths[index]
        try:
            return _decode(path, self.channels, self.size), ""
        except (RuntimeError, OSError, ValueError) as error:
            problem = _cannot_decode(path, error)
        return torch.zeros(self.channels, *self.size, dtype=torch.uint8), problem


def _channels(path: Path) -> int:
    """1 for a grayscale image file, else 3, from its header alone."""
    from PIL import Image, ImageMode, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            return 1 if ImageMode.getmode(opened.mode).basemode == "L" else 3
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(_cannot_decode(path, error)) from None


def _image_folder(folder: Path) -> Dataset:
    """A labelled data set from an ``ImageFolder`` layout (see the module docstring), decoded
    through a DataLoader: by worker processes for more than :data:`FOLDER_WORKERS_FROM` images
    (below that, starting them costs more than it saves)."""
    files, labels, classes = _image_files(folder)
    gray = sum(_channels(path) == 1 for path in files)
    channels = 1 if 2 * gray > len(files) else 3
    try:
        first = _decode(files[0], channels, None)  # (C, H, W)
    except (RuntimeError, OSError, ValueError) as error:
        raise ValueError(_cannot_decode(files[0], error)) from None
    workers = min(FOLDER_WORKERS, os.cpu_count() or 1) if len(files) > FOLDER_WORKERS_FROM else 0
    loader = torch_data.DataLoader(
        _ImageFiles(files, channels, tuple(first.shape[1:])),
        batch_size=FOLDER_BATCH,
        num_workers=workers,
    )
    batches = []
    for images, problems in loader:  # images (B, C, H, W) uint8
        problem = next((p for p in problems if p), None)
        if problem:
            raise ValueError(problem)
        batches.append(images)
    x = torch.cat(batches).float().div_(255)  # (N, C, H, W) float32 in [0, 1]
    return Dataset(x, torch.tensor(labels, dtype=torch.long), classes)


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
        return _image_folder(path)
    if source.endswith(".npz"):
        return _npz(path)
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
            _image_files(path)
        elif source.endswith(".npz"):
            _npz_layout(path)
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
