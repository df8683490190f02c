"""Data sources that ship as one file are split once, the same way on every machine."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from amalgam.fusion.data import SourceUnavailable, load_source


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
