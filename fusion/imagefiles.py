"""Data a user brings as files: ``.npz`` archives with documented keys, ``ImageFolder``
layouts, and single image files (the keys, the layout and the checks are in
:mod:`amalgam.fusion.data`'s docstring). Each reader gives arrays; :func:`load_source` makes
the data set. Every problem is a ``ValueError`` of one line naming the file."""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils import data as torch_data

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PILLOW_EXTENSIONS = (".bmp", ".tif", ".tiff")  # formats torchvision.io cannot decode
FOLDER_WORKERS_FROM = 2000  # image folders larger than this are decoded by worker processes
FOLDER_WORKERS = 4  # at most this many, and no more than the CPUs
FOLDER_BATCH = 256  # images per decoding batch
NPZ_KEYS = ("x", "y", "class_names")


def npz_layout(path: Path) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
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


def read_npz(path: Path) -> tuple[Tensor, Tensor | None, list[str]]:
    """An ``.npz`` file's (N, C, H, W) float32 images in [0, 1], (N,) labels or None, and
    class names.

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
    npz_layout(path)
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
    return images, labels, names


def _folder_problem(folder: Path, problem: str) -> ValueError:
    expected = ", ".join(IMAGE_EXTENSIONS)
    return ValueError(
        f"{folder}: {problem} (expected <class>/<image> files with extensions {expected})"
    )


def image_files(folder: Path) -> tuple[list[Path], list[int], list[str]]:
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


def read_image_folder(folder: Path) -> tuple[Tensor, Tensor, list[str]]:
    """The (N, C, H, W) float32 images in [0, 1], (N,) labels and class names of an
    ``ImageFolder`` layout (see the module docstring), decoded
    through a DataLoader: by worker processes for more than :data:`FOLDER_WORKERS_FROM` images
    (below that, starting them costs more than it saves)."""
    files, labels, classes = image_files(folder)
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
    return x, torch.tensor(labels, dtype=torch.long), classes
