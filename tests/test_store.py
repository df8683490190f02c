"""The job store records each party answer per chunk (one call to the party) and replays it: a
job resumed after a kill asks no chunk it has recorded again."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import dataclass, field

import torch
from parties import tiny_handler

from amalgam.fusion.teacher import Detections, TeacherInfo
from amalgam.party.audit import read_records
from amalgam.party.local import LocalTeacher
from amalgam.protocol.schemas import Policy, PredictPolicy
from amalgam.server.store import JobStore, ReplayTeacher


def _granted(handler) -> list[int]:
    records = read_records(handler.audit.path)
    return [r["samples"] for r in records if (r["method"], r["decision"]) == ("Predict", "granted")]


def test_predictions_are_recorded_per_chunk_and_replayed_without_asking_again(tmp_path):
    handler = tiny_handler(tmp_path, Policy(predict=PredictPolicy(output="probs"), max_batch=16))
    store = JobStore(tmp_path / "jobs.sqlite")
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    first = ReplayTeacher(LocalTeacher(handler), store, "job-1").predict(x)
    assert _granted(handler) == [16, 16, 8]  # one recorded answer per call to the party
    with closing(sqlite3.connect(store.path)) as db:
        assert db.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 3
    # a resumed job (a fresh process, the same store) is answered from the store
    again = ReplayTeacher(LocalTeacher(handler), JobStore(store.path), "job-1").predict(x)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert _granted(handler) == [16, 16, 8]
    # one chunk more than was recorded: only it is asked
    ReplayTeacher(LocalTeacher(handler), store, "job-1").predict(torch.cat([x, x[:5]]))
    assert _granted(handler) == [16, 16, 8, 13]
    ReplayTeacher(LocalTeacher(handler), store, "job-2").predict(x)  # another job pays anew
    assert _granted(handler) == [16, 16, 8, 13, 16, 16, 8]


@dataclass
class CountingDetector:
    """A detection party that finds one box per image and counts the images it was asked."""

    info: TeacherInfo = TeacherInfo("det", ("a", "b"), (1, 8, 8), "detections", max_batch=3)
    asked: list[int] = field(default_factory=list)

    def detect(self, x):
        self.asked.append(len(x))
        return [
            Detections(torch.tensor([[0.0, 0, 4, 4 + i]]), torch.tensor([i % 2]), torch.ones(1))
            for i in range(len(x))
        ]


def test_detections_are_recorded_per_chunk_and_replayed(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    x = torch.rand(7, 1, 8, 8)
    detector = CountingDetector()
    first = ReplayTeacher(detector, store, "job").detect(x)
    again = ReplayTeacher(CountingDetector(), store, "job").detect(x)
    assert detector.asked == [3, 3, 1]
    assert len(first) == len(again) == 7
    for a, b in zip(first, again):
        torch.testing.assert_close((a.boxes, a.labels, a.scores), (b.boxes, b.labels, b.scores))
    assert [float(d.boxes[0, 3]) for d in again] == [4.0, 5.0, 6.0, 4.0, 5.0, 6.0, 4.0]
