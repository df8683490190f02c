"""The coordinator's job store: one SQLite file beside the run folders (``<output_dir>/
jobs.sqlite``) with every job's spec and status, and every party answer it paid for.

A job killed part-way is resumed with ``amalgam fuse --resume <job-id>``: the answers already
recorded are replayed instead of asked again (no party charges a sample twice), and training
goes on from its last checkpoint in ``runs/<job-id>/checkpoints/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from amalgam.fusion.teacher import (
    Detections,
    Feedback,
    Synthesis,
    Teacher,
    TeacherInfo,
    Weights,
    concat_chunks,
    split_chunks,
)
from amalgam.server.jobspec import JobSpec

STORE_NAME = "jobs.sqlite"
# columns added since the first stores: (name, declaration), added where missing
LATER_COLUMNS = [("pid", "INTEGER NOT NULL DEFAULT 0"), ("pid_started", "REAL NOT NULL DEFAULT 0")]
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,          -- running | done | failed | stopped
    run_dir TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    error TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS log (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    time REAL NOT NULL,
    line TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    party TEXT NOT NULL,
    request TEXT NOT NULL,         -- SHA-256 of the call and its inputs
    payload BLOB NOT NULL,         -- safetensors bytes
    PRIMARY KEY (job_id, party, request)
);
"""


def new_job_id(spec: JobSpec) -> str:
    """``<job name>-<date>-<time>-<6 hex digits>``: sortable, and unique in practice."""
    return f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


class UnknownJob(LookupError):
    """No job of that id in the store."""


@dataclass(frozen=True)
class JobRecord:
    """A job as the store has it.

    Attributes
    ----------
    status : running | done | failed | stopped, as the job's process last wrote it.
    pid, pid_started : the process that runs (or ran) it and its start time, which tell it
        from a later process that got the same pid.
    """

    id: str
    spec: JobSpec
    status: str
    run_dir: Path
    error: str
    created: float
    updated: float
    pid: int
    pid_started: float

    @property
    def state(self) -> str:
        """``status``, except ``interrupted`` for a job marked running whose process is gone
        (killed; ``amalgam fuse --resume`` goes on with it)."""
        return "interrupted" if self.status == "running" and not self.alive() else self.status

    def alive(self) -> bool:
        """Whether the process that runs the job is still running."""
        if self.pid <= 0:
            return False
        try:
            return abs(psutil.Process(self.pid).create_time() - self.pid_started) < 1.0
        except psutil.Error:
            return False


JOB_COLUMNS = "id, spec, status, run_dir, error, created, updated, pid, pid_started"


def _job(row: tuple) -> JobRecord:
    spec = JobSpec.model_validate_json(row[1])
    return JobRecord(row[0], spec, row[2], Path(row[3]), *row[4:])


class JobStore:
    """Thread-safe access to one ``jobs.sqlite`` (parties are called from several threads)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        present = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, declaration in LATER_COLUMNS:
            if name not in present:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")
        self._lock = threading.Lock()

    @classmethod
    def beside(cls, output_dir: str | Path) -> JobStore:
        return cls(Path(output_dir) / STORE_NAME)

    def create(self, spec: JobSpec) -> JobRecord:
        """A new job, status ``running``, with its (empty) run folder."""
        job_id = new_job_id(spec)
        run_dir = Path(spec.output_dir) / job_id
        run_dir.mkdir(parents=True, exist_ok=False)
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, name, spec, status, run_dir, created, updated) "
                "VALUES (?, ?, ?, 'running', ?, ?, ?)",
                (job_id, spec.name, spec.model_dump_json(), str(run_dir), now, now),
            )
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._db.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        if row is None:
            raise UnknownJob(f"no job {job_id!r} in {self.path}")
        return _job(row)

    def jobs(self) -> list[JobRecord]:
        """Every job, oldest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY created").fetchall()
        return [_job(row) for row in rows]

    def claim(self, job_id: str) -> None:
        """Mark the job running in this process (what ``amalgam jobs stop`` signals)."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = 'running', error = '', pid = ?, pid_started = ?, "
                "updated = ? WHERE id = ?",
                (os.getpid(), psutil.Process().create_time(), time.time(), job_id),
            )

    def log(self, job_id: str, line: str) -> None:
        with self._lock:
            self._db.execute("INSERT INTO log VALUES (?, ?, ?)", (job_id, time.time(), line))

    def lines(self, job_id: str, after: int = 0) -> list[tuple[int, float, str]]:
        """The job's log lines after row ``after``: (row, time, line), in order."""
        with self._lock:
            return self._db.execute(
                "SELECT rowid, time, line FROM log WHERE job_id = ? AND rowid > ? ORDER BY rowid",
                (job_id, after),
            ).fetchall()

    def paid(self, job_id: str) -> dict[str, tuple[int, int]]:
        """Per party: the answers recorded for the job and their bytes."""
        with self._lock:
            rows = self._db.execute(
                "SELECT party, COUNT(*), SUM(LENGTH(payload)) FROM answers WHERE job_id = ? "
                "GROUP BY party ORDER BY party",
                (job_id,),
            ).fetchall()
        return {party: (count, size) for party, count, size in rows}

    def set_status(self, job_id: str, status: str, error: str = "") -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = ?, error = ?, updated = ? WHERE id = ?",
                (status, error, time.time(), job_id),
            )

    def answer(self, job_id: str, party: str, request: str) -> bytes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT payload FROM answers WHERE job_id = ? AND party = ? AND request = ?",
                (job_id, party, request),
            ).fetchone()
        return None if row is None else row[0]

    def record(self, job_id: str, party: str, request: str, payload: bytes) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?)",
                (job_id, party, request, payload),
            )

    def close(self) -> None:
        self._db.close()


def _request_key(method: str, *parts: object) -> str:
    digest = hashlib.sha256(method.encode())
    for part in parts:
        if isinstance(part, Tensor):
            t = part.detach().contiguous().cpu()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True).encode())
    return digest.hexdigest()


class ReplayTeacher:
    """A :class:`amalgam.fusion.teacher.Teacher` that records each answer of ``teacher`` in the job
    store, one chunk (one call to the party) at a time, and replays it when the same chunk is
    asked again (a resumed job asks what it asked before): a job killed at any point re-pays
    nothing it has recorded, and the one chunk in flight at the kill is answered again from
    the party's replay cache. Predict, Activations, Gram, ExportWeights and detections are
    recorded; BatchNormFeedback and Synthesize are passed through (generator training sends
    too much, and Synthesize changes the party's state)."""

    def __init__(self, teacher: Teacher, store: JobStore, job_id: str) -> None:
        self.teacher, self.store, self.job_id = teacher, store, job_id

    @property
    def info(self) -> TeacherInfo:
        return self.teacher.info

    @property
    def stats(self):
        return self.teacher.stats

    def _chunk_size(self, x: Tensor) -> int:
        """The samples of one call to the party: the teacher's own chunking where it has one
        (a remote party's message limit), else the party's ``max_batch`` (0: all at once)."""
        sized = getattr(self.teacher, "chunk_size", None)
        return sized(x) if callable(sized) else self.info.max_batch

    def _recorded(self, key: str) -> dict[str, Tensor] | None:
        payload = self.store.answer(self.job_id, self.info.name, key)
        return None if payload is None else safetensors_load(payload)

    def _record(self, key: str, answer: dict[str, Tensor]) -> dict[str, Tensor]:
        """Record ``answer`` under ``key``; returns it as a replay would (the same bits)."""
        payload = safetensors_save({k: v.contiguous() for k, v in answer.items()})
        self.store.record(self.job_id, self.info.name, key, payload)
        return safetensors_load(payload)

    def _replayed(self, key: str, ask: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        recorded = self._recorded(key)
        return recorded if recorded is not None else self._record(key, ask())

    def predict(self, x: Tensor) -> Tensor:
        """The chunks not recorded yet are asked together, where the teacher can carry them
        in fewer messages (``predict_chunks``), each recorded as its answer arrives."""
        parts = split_chunks(x, self._chunk_size(x))
        keys = [_request_key("Predict", part) for part in parts]
        answers = [self._recorded(key) for key in keys]
        missing = [index for index, answer in enumerate(answers) if answer is None]

        def record(position: int, out: Tensor) -> None:
            index = missing[position]
            answers[index] = self._record(keys[index], {"outputs": out})

        ask_many = getattr(self.teacher, "predict_chunks", None)
        if ask_many is not None:
            ask_many([parts[index] for index in missing], on_answer=record)
        else:
            for position, index in enumerate(missing):
                record(position, self.teacher.predict(parts[index]))
        return torch.cat([answer["outputs"] for answer in answers])

    def detect(self, x: Tensor) -> list[Detections]:
        def chunk(part: Tensor) -> list[Detections]:
            key = _request_key("Detect", part)
            rows = self._replayed(key, lambda: _detection_rows(self.teacher.detect(part)))
            return Detections.split(rows["boxes"], rows["scores"], rows["labels"], rows["counts"])

        step = self._chunk_size(x) or len(x)
        return [
            found for start in range(0, len(x), step) for found in chunk(x[start : start + step])
        ]

    def activations(self, x: Tensor, layers: list[str]) -> dict[str, Tensor]:
        def chunk(part: Tensor) -> dict[str, Tensor]:
            key = _request_key("Activations", part, layers)
            return self._replayed(key, lambda: self.teacher.activations(part, layers))

        return concat_chunks(chunk, x, self._chunk_size(x))

    def gram(self, x: Tensor, layers: list[str]) -> dict[str, Tensor]:
        key = _request_key("Gram", x, layers)  # one call: a Gram matrix spans the batch
        return self._replayed(key, lambda: self.teacher.gram(x, layers))

    def weights(self) -> Weights:
        party, key = self.info.name, _request_key("ExportWeights")
        payload = self.store.answer(self.job_id, party, key)
        if payload is None:
            weights = self.teacher.weights()
            state = {k: v.contiguous() for k, v in weights.state_dict.items()}
            payload = safetensors_save(
                state, metadata={"architecture": json.dumps(weights.architecture)}
            )
            self.store.record(self.job_id, party, key, payload)
        architecture = json.loads(_metadata(payload)["architecture"])
        return Weights.from_safetensors(architecture, payload)

    def bn_feedback(self, *args, **kwargs) -> Feedback:
        return self.teacher.bn_feedback(*args, **kwargs)

    def synthesize(self, *args, **kwargs) -> Synthesis:
        return self.teacher.synthesize(*args, **kwargs)


def _detection_rows(found: list[Detections]) -> dict[str, Tensor]:
    """Per-image detections as the rows :meth:`Detections.split` takes back."""
    return {
        "boxes": torch.cat([d.boxes for d in found]).reshape(-1, 4),
        "scores": torch.cat([d.scores for d in found]).reshape(-1),
        "labels": torch.cat([d.labels for d in found]).reshape(-1),
        "counts": torch.tensor([len(d) for d in found], dtype=torch.long),
    }


def _metadata(payload: bytes) -> dict[str, str]:
    """The metadata of safetensors bytes: an 8-byte little-endian header length, then JSON."""
    size = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8 : 8 + size]).get("__metadata__", {})


class FileCheckpoint:
    """A :class:`amalgam.fusion.train.Checkpoint` in one file, replaced atomically on save (written
    beside it, then renamed), read with ``weights_only`` (tensors and plain values only)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        return torch.load(self.path, weights_only=True)

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        partial = self.path.with_suffix(".partial")
        partial.write_bytes(buffer.getvalue())
        os.replace(partial, self.path)


class Checkpoints:
    """One :class:`FileCheckpoint` per training run of a job, by name."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, name: str) -> FileCheckpoint:
        return FileCheckpoint(self.folder / f"{name}.pt")
