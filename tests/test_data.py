"""Data sources: sets that ship as one file are split once, the same way on every machine;
.npz files and image folders load exactly or are refused in one line; check_source finds problems
without loading."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from torch.utils import data as torch_data
from torchvision.io import encode_png, write_png

from amalgam.fusion import imagefiles
from amalgam.fusion.data import SourceUnavailable, check_source, load_source


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def notmnist(tmp_path, monkeypatch):
    folder = tmp_path / "notmnist"
    folder.mkdir()
    images = np.arange(50, dtype=np.uint8)[:, None, None] * np.ones((1, 2, 2), np.uint8)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", images)  # image k is filled with k
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(50) % 10)
    monkeypatch.setenv("AMALGAM_DATA", str(tmp_path))


def _ids(source: str) -> set[int]:
    data = load_source(source)
    return {round(float(v) * 255) for v in data.x[:, 0, 0, 0]}


def test_a_single_file_set_splits_80_20_disjoint_and_reproducibly(notmnist):
    train, test = _ids("notmnist:train"), _ids("notmnist:test")
    assert len(train) == 40 and len(test) == 10 and not train & test
    assert train | test == set(range(50))
    assert _ids("notmnist:train") == train
    assert load_source("notmnist:test").class_names == list("ABCDEFGHIJ")


def test_unknown_part_and_absent_files_are_named(notmnist, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="notmnist has no part 'all2'; parts: train, test$"):
        load_source("notmnist:all2")
    monkeypatch.setenv("AMALGAM_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(SourceUnavailable, match="kannada_mnist"):
        load_source("kannada:train")


def _png(path, image: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(image, str(path))


def _pixels(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )


def _one_line_naming(message: str, name) -> bool:
    return str(name) in message and "\n" not in message


def test_an_image_folder_loads_its_classes_pixels_and_labels(tmp_path):
    images = {"cat/a.png": _pixels(0, (3, 4, 5)), "cat/b.PNG": _pixels(1, (3, 4, 5))}
    images["dog/c.png"] = _pixels(2, (3, 4, 5))
    for name, image in images.items():
        _png(tmp_path / "photos" / name, image)
    (tmp_path / "photos" / "dog" / "notes.txt").write_text("not an image")
    data = load_source(str(tmp_path / "photos"))
    assert data.class_names == ["cat", "dog"]
    assert data.y.tolist() == [0, 0, 1]
    expected = torch.stack(list(images.values())).float() / 255  # (3, 3, 4, 5)
    assert data.x.dtype == torch.float32 and torch.equal(data.x, expected)


def test_a_grayscale_folder_gives_one_channel_and_the_majority_decides(tmp_path):
    gray = [_pixels(i, (1, 6, 6)) for i in range(3)]
    for i, image in enumerate(gray):
        _png(tmp_path / "gray" / "only" / f"{i}.png", image)
    data = load_source(str(tmp_path / "gray"))
    assert data.x.shape == (3, 1, 6, 6)
    assert torch.equal(data.x, torch.stack(gray).float() / 255)

    _png(tmp_path / "mixed" / "a" / "0.png", torch.full((1, 6, 6), 90, dtype=torch.uint8))
    _png(tmp_path / "mixed" / "a" / "1.png", _pixels(5, (3, 6, 6)))
    _png(tmp_path / "mixed" / "b" / "2.png", _pixels(6, (3, 6, 6)))
    mixed = load_source(str(tmp_path / "mixed"))
    assert mixed.x.shape == (3, 3, 6, 6)
    assert torch.all(mixed.x[0] == 90 / 255)  # the gray image repeated over RGB


def test_images_of_other_sizes_are_resized_to_the_first(tmp_path):
    _png(tmp_path / "sizes" / "k" / "0.png", _pixels(0, (3, 4, 6)))
    _png(tmp_path / "sizes" / "k" / "1.png", torch.full((3, 8, 12), 200, dtype=torch.uint8))
    _png(tmp_path / "sizes" / "k" / "2.png", torch.full((3, 3, 3), 40, dtype=torch.uint8))
    data = load_source(str(tmp_path / "sizes"))
    assert data.x.shape == (3, 3, 4, 6)
    assert torch.all(data.x[1] == 200 / 255) and torch.all(data.x[2] == 40 / 255)


def test_folders_without_classes_or_images_are_refused_in_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no class subfolders") as error:
        load_source(str(empty))
    assert _one_line_naming(str(error.value), empty)
    (tmp_path / "texts" / "a").mkdir(parents=True)
    (tmp_path / "texts" / "a" / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"no images \(expected <class>/<image> files") as error:
        load_source(str(tmp_path / "texts"))
    assert _one_line_naming(str(error.value), tmp_path / "texts")
    assert ".png, .jpg, .jpeg, .bmp, .gif, .webp, .tif, .tiff" in str(error.value)


@pytest.mark.parametrize("truncated", [False, True])
def test_an_undecodable_image_is_named_in_one_line(tmp_path, truncated):
    _png(tmp_path / "broken" / "a" / "0.png", _pixels(0, (3, 4, 4)))
    bad = tmp_path / "broken" / "a" / "1.png"
    png = bytes(encode_png(_pixels(1, (3, 40, 40))).numpy())
    bad.write_bytes(png[: len(png) // 2] if truncated else b"not a png at all")
    with pytest.raises(ValueError, match="cannot decode") as error:
        load_source(str(tmp_path / "broken"))
    assert _one_line_naming(str(error.value), bad)


def test_worker_processes_decode_a_large_folder_as_one_process_does(tmp_path, monkeypatch):
    for i in range(20):
        _png(tmp_path / "many" / f"c{i % 3}" / f"{i:02}.png", _pixels(i, (3, 5, 5)))
    alone = load_source(str(tmp_path / "many"))
    workers = []

    class Recording(torch_data.DataLoader):
        def __init__(self, *args, **kwargs):
            workers.append(kwargs["num_workers"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch_data, "DataLoader", Recording)
    monkeypatch.setattr(imagefiles, "FOLDER_WORKERS_FROM", 10)
    monkeypatch.setattr(imagefiles, "FOLDER_WORKERS", 2)
    monkeypatch.setattr(imagefiles, "FOLDER_BATCH", 4)
    parallel = load_source(str(tmp_path / "many"))
    assert workers == [2]
    assert torch.equal(parallel.x, alone.x) and torch.equal(parallel.y, alone.y)
    assert parallel.class_names == alone.class_names == ["c0", "c1", "c2"]


def test_uint8_npz_is_divided_by_255_and_float_npz_kept(tmp_path):
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10  # (N, H, W)
    np.savez(tmp_path / "u8.npz", x=x, y=np.array([1, 0]), other=np.zeros(3))
    data = load_source(str(tmp_path / "u8.npz"))
    assert torch.equal(data.x, torch.from_numpy(x).float().unsqueeze(1) / 255)
    assert data.y.tolist() == [1, 0] and data.class_names == ["0", "1"]

    f = np.linspace(0, 1, 2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    np.savez(tmp_path / "f.npz", x=f, y=np.array([0, 2]), class_names=np.array(["a", "b", "c"]))
    data = load_source(str(tmp_path / "f.npz"))
    assert torch.equal(data.x, torch.from_numpy(f)) and data.class_names == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"x": np.array([[[-0.3, 37.2]]])},
            r"x holds values in \[-0.3, 37.2\]; floating images must lie in \[0, 1\] "
            r"\(store 0..255 images as uint8\)$",
        ),
        ({"x": np.array([[[0.5, np.nan]]])}, "x holds NaN or infinite values"),
        ({"x": np.zeros((2, 3, 3), np.int32)}, "x has dtype int32; integer images must be uint8"),
        ({"x": np.zeros((2, 3, 3), bool)}, "x has dtype bool; expected uint8"),
        ({"x": np.zeros((2, 3), np.uint8)}, r"x has shape \(2, 3\); expected \(N, C, H, W\)"),
        ({"y": np.zeros(2, int)}, "no array 'x'"),
        ({"x": np.zeros((2, 3, 3), np.uint8), "y": np.zeros(3, int)}, r"y has shape \(3,\)"),
        ({"x": np.zeros((2, 3, 3), np.uint8), "y": np.zeros(2)}, "y has dtype float64"),
        (
            {"x": np.zeros((2, 3, 3), np.uint8), "y": np.array([0, 2]), "class_names": ["a", "b"]},
            r"y holds class indices in \[0, 2\] but class_names has 2 names",
        ),
        ({"x": np.zeros((2, 3, 3), np.uint8), "y": np.array([-1, 0])}, "they start at 0"),
    ],
)
def test_npz_files_that_break_the_documented_keys_are_refused(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message) as error:
        load_source(str(path))
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


def test_check_source_finds_problems_without_loading(tmp_path, monkeypatch):
    np.savez(tmp_path / "good.npz", x=np.zeros((2, 3, 3), np.uint8))
    _png(tmp_path / "photos" / "a" / "0.png", _pixels(0, (3, 2, 2)))
    assert check_source(str(tmp_path / "good.npz")) is None
    assert check_source(str(tmp_path / "photos")) is None
    assert check_source("digits:test") is None

    problems = {
        str(tmp_path / "missing.npz"): f"{tmp_path / 'missing.npz'}: no such file",
        f"{tmp_path / 'nowhere'}/": f"{tmp_path / 'nowhere'}/: no such folder",
        "nosuchset:train": "unknown data source 'nosuchset:train'; use <set>:<part> with set one",
        "digits:nosuchpart": "digits has no part 'nosuchpart'; parts: private-0, private-1",
    }
    np.savez(tmp_path / "no_x.npz", y=np.zeros(2, int))
    problems[str(tmp_path / "no_x.npz")] = f"{tmp_path / 'no_x.npz'}: no array 'x'"
    np.savez(tmp_path / "int.npz", x=np.zeros((2, 3, 3), np.int32))
    problems[str(tmp_path / "int.npz")] = "x has dtype int32; integer images must be uint8"
    (tmp_path / "empty").mkdir()
    problems[str(tmp_path / "empty")] = f"{tmp_path / 'empty'}: no class subfolders"
    for source, expected in problems.items():
        problem = check_source(source)
        assert problem is not None and expected in problem and "\n" not in problem, source
    for form in ("<set>:<part>", ".npz", "image folder"):
        assert form in check_source("nosuchset:train")

    monkeypatch.setenv("AMALGAM_DATA", str(tmp_path / "elsewhere"))
    absent = tmp_path / "elsewhere" / "notmnist" / "t10k-images-idx3-ubyte.gz"
    assert check_source("notmnist:train") == (
        f"{absent} not found (set AMALGAM_DATA to the shared data folder)"
    )


def test_bmp_and_tiff_images_decode_exactly(tmp_path):
    from PIL import Image

    images = [_pixels(i, (3, 4, 5)) for i in range(3)]
    _png(tmp_path / "formats" / "k" / "0.png", images[0])
    for image, name in zip(images[1:], ("1.BMP", "2.tif")):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "formats" / "k" / name)
    data = load_source(str(tmp_path / "formats"))
    assert torch.equal(data.x, torch.stack(images).float() / 255)
