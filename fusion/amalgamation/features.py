"""Teacher features on the coordinator's unlabeled images, fetched through the ``Activations``
capability chunk by chunk and written straight to disk in float16: memory stays bounded by one
chunk, and a feature the coordinator already holds is not asked for again."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from amalgam.fusion.data import fit_to_shape
from amalgam.fusion.progress import progress_bar
from amalgam.fusion.teacher import Teacher

CHUNK_BYTES = 16 * 1024 * 1024  # feature bytes asked for in one call
COMPLETE = "complete"  # marker file: every chunk of the entry is on disk


class FeatureCache:
    """Features ``{layer: (t, ...)}`` of one party on inputs ``x``, as float16 arrays mapped
    from ``folder/<party>-<digest of layers and inputs>/<layer>.npy``.

    Parameters
    ----------
    folder : where the entries live; kept across jobs (delete it to free the disk).
    wire_bytes : bytes per value on the wire (2 when the parties answer in float16), for
        :attr:`bytes_moved`.

    Attributes
    ----------
    bytes_moved : feature bytes received per party by this cache.
    bytes_reused : feature bytes per party read from entries made earlier, not asked again.
    """

    def __init__(self, folder: str | Path, wire_bytes: int = 2) -> None:
        self.folder = Path(folder)
        self.wire_bytes = wire_bytes
        self.bytes_moved: dict[str, int] = defaultdict(int)
        self.bytes_reused: dict[str, int] = defaultdict(int)

    def entry(self, party: str, layers: Sequence[str], x: Tensor) -> Path:
        digest = hashlib.sha256(json.dumps([party, list(layers), list(x.shape)]).encode())
        digest.update(x.contiguous().numpy().tobytes())
        return self.folder / f"{party}-{digest.hexdigest()[:20]}"

    def fetch(
        self,
        teacher: Teacher,
        x: Tensor,
        layers: Sequence[str],
        *,
        progress: bool = True,
        position: int = 0,
    ) -> dict[str, Tensor]:
        """The outputs of ``layers`` of ``teacher`` on (t, C, H, W) images in [0, 1], as
        float16 tensors backed by the cache files; asked for only where not cached."""
        name, layers = teacher.info.name, list(dict.fromkeys(layers))
        x = fit_to_shape(x, tuple(teacher.info.input_shape))
        folder = self.entry(name, layers, x)
        files = {layer: folder / f"{layer}.npy" for layer in layers}
        if (folder / COMPLETE).exists():
            self.bytes_reused[name] += sum(
                int(np.load(f, mmap_mode="r").size) * self.wire_bytes for f in files.values()
            )
            return _mapped(files)
        folder.mkdir(parents=True, exist_ok=True)
        first = teacher.activations(x[:1], layers)  # one sample: the shapes to allocate
        per_sample = sum(first[layer][0].numel() for layer in layers) * self.wire_bytes
        chunk = max(1, CHUNK_BYTES // per_sample)
        if teacher.info.max_batch:
            chunk = min(chunk, teacher.info.max_batch)
        arrays = {
            layer: np.lib.format.open_memmap(
                files[layer], "w+", np.float16, (len(x), *first[layer].shape[1:])
            )
            for layer in layers
        }
        with progress_bar(
            len(x), f"features {name}", unit="img", position=position, show=progress
        ) as bar:
            start, out = 0, first
            while True:
                stop = start + len(next(iter(out.values())))
                for layer in layers:
                    arrays[layer][start:stop] = out[layer].to(torch.float16).numpy()
                self.bytes_moved[name] += per_sample * (stop - start)
                bar.update(stop - start)
                if stop >= len(x):
                    break
                start = stop
                out = teacher.activations(x[start : start + chunk], layers)
        for array in arrays.values():
            array.flush()
        (folder / COMPLETE).touch()
        return _mapped(files)


def _mapped(files: dict[str, Path]) -> dict[str, Tensor]:
    # copy-on-write maps: writable for torch, the files stay as written
    return {layer: torch.from_numpy(np.load(f, mmap_mode="c")) for layer, f in files.items()}
