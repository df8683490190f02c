"""Failures on either side lose nothing: a party killed mid-job is dropped and the job finishes
degraded (or stops naming it, below min_parties); a party answering NaN is quarantined; a
coordinator killed at any point of a job resumes from its job store with the same result and
without charging any party twice."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import ExitStack, closing
from pathlib import Path

import pytest
import torch
import yaml
from parties import tiny_handler
from safetensors.torch import save_file
from torch import nn

from amalgam.fusion.data import DIGIT_NAMES, load_source
from amalgam.fusion.models import create_model
from amalgam.fusion.train import fit
from amalgam.party.audit import read_records
from amalgam.protocol.schemas import Policy, PredictPolicy
from amalgam.server.job import connect, load_job, run_job
from amalgam.server.roster import TooFewParties
from amalgam.server.simulation.demo import PartyProcess
from amalgam.server.simulation.parties import serving
from amalgam.server.store import JobStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 5.0
SHARDS = ["digits:private-0", "digits:private-1", "digits:private-2", "digits:public"]
HIDDEN = 32


@pytest.fixture(scope="module")
def teachers() -> list[nn.Module]:
    """Four small MLPs, each trained on its own digits shard (all ten classes)."""
    models = []
    for k, shard in enumerate(SHARDS):
        data = load_source(shard)
        torch.manual_seed(k)
        model = create_model("mlp", in_shape=(1, 8, 8), num_classes=10, hidden=HIDDEN)
        fit(model, data.x, data.y, epochs=30, batch_size=32, seed=k, progress=False)
        models.append(model.eval())
    return models


def _job(folder: Path, addresses: dict[str, str], **overrides) -> Path:
    job = {
        "name": "resilience",
        "seed": 0,
        "parties": [{"name": n, "address": a} for n, a in addresses.items()],
        "method": {"name": "composition"},
        "student": {"arch": "small_cnn", "epochs": 6, "batch_size": 32},
        "data": {"unlabeled": "digits:public", "test": "digits:test"},
        "output_dir": str(folder / "runs"),
        "deadline_s": DEADLINE_S,
        "baselines": False,
        **overrides,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


# --- a party dies mid-job ---------------------------------------------------------------------


def _party_processes(folder: Path, teachers, stack: ExitStack) -> dict[str, PartyProcess]:
    """``amalgam party serve --insecure`` for each teacher; a small max_batch makes each
    party answer in several calls."""
    configs = []
    for k, model in enumerate(teachers):
        name = f"org{k}"
        save_file(model.state_dict(), str(folder / f"{name}.safetensors"))
        config = {
            "name": name,
            "model": {
                "arch": "mlp",
                "kwargs": {"in_shape": [1, 8, 8], "num_classes": 10, "hidden": HIDDEN},
                "weights": f"{name}.safetensors",
            },
            "class_names": DIGIT_NAMES,
            "input_shape": [1, 8, 8],
            "policy": {"predict": {"output": "probs"}, "max_batch": 64},
            "audit_log": f"{name}-audit.jsonl",
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
        configs.append(folder / f"{name}.yaml")
    processes = {}
    for path in configs:
        process = PartyProcess(path, insecure=True)
        stack.callback(process.stop)
        processes[path.stem] = process
    return processes


def _kill_after_first_answer(teacher, process: PartyProcess, killed: dict) -> None:
    """SIGKILL the party right after it answered its first Predict call."""
    ask = teacher.predict_chunks

    def ask_then_die(parts, on_answer=None):
        def answered(index, out):
            if on_answer is not None:
                on_answer(index, out)
            if not killed:
                process.process.kill()
                process.process.wait()
                killed["at"] = time.monotonic()

        return ask(parts, on_answer=answered)

    teacher.predict_chunks = ask_then_die


class TimedLog:
    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []

    def __call__(self, message: str) -> None:
        self.lines.append((time.monotonic(), message))

    def first(self, text: str) -> float:
        return next(at for at, line in self.lines if text in line)


def test_a_party_killed_mid_job_is_dropped_and_the_job_finishes_degraded(teachers, tmp_path):
    log = TimedLog()
    with ExitStack() as stack:
        processes = _party_processes(tmp_path, teachers, stack)
        addresses = {name: p.address for name, p in processes.items()}
        spec = load_job(_job(tmp_path, addresses, min_parties=3))
        clients = connect(spec, log=log)
        killed: dict = {}
        _kill_after_first_answer(clients[3], processes["org3"], killed)
        run_dir = run_job(spec, clients, progress=False, log=log)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    reason = metrics["extra"]["dropped_parties"]["org3"]
    assert "party org3" in reason and "unreachable" in reason
    assert {"teacher:org0", "teacher:org1", "teacher:org2", "student"} <= set(metrics["results"])
    assert "teacher:org3" not in metrics["results"]
    assert metrics["results"]["student"] > 0.8
    assert "DEGRADED: party org3 was dropped" in (run_dir / "report.md").read_text()
    # the job gave up on the dead party within one call deadline + 10%
    delay = log.first("party org3 dropped") - killed["at"]
    print(f"party dropped {delay:.2f}s after it was killed (deadline {DEADLINE_S}s)")
    assert delay <= 1.1 * DEADLINE_S


def test_below_min_parties_the_job_stops_naming_the_lost_party(teachers, tmp_path):
    with ExitStack() as stack:
        processes = _party_processes(tmp_path, teachers, stack)
        spec = load_job(_job(tmp_path, {n: p.address for n, p in processes.items()}))
        clients = connect(spec, log=lambda message: None)
        _kill_after_first_answer(clients[1], processes["org1"], {})
        started = time.monotonic()
        with pytest.raises(TooFewParties, match=r"3 of 4 parties left, the job needs 4.*org1"):
            run_job(spec, clients, progress=False, log=lambda message: None)
        assert time.monotonic() - started < 1.1 * DEADLINE_S + 30  # no hang


def _closed_port() -> str:
    """An address where nothing listens: a port the system gave out, then closed."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def test_a_party_down_at_the_start_is_left_out_as_min_parties_allows(teachers, tmp_path):
    policy = Policy(predict=PredictPolicy(output="probs"), max_batch=64)
    handlers = [
        tiny_handler(tmp_path, policy, name=f"org{k}", classes=DIGIT_NAMES, model=model)
        for k, model in enumerate(teachers[:2])
    ]
    with serving(handlers[0]) as a, serving(handlers[1]) as b:
        addresses = {"org0": a, "org1": b, "org2": _closed_port()}
        spec = load_job(_job(tmp_path, addresses, min_parties=2, deadline_s=2))
        clients = connect(spec, log=lambda message: None)
        assert [c.name for c in clients] == ["org0", "org1"]
        run_dir = run_job(spec, clients, progress=False, log=lambda message: None)
        with pytest.raises(TooFewParties, match=r"2 of 3 parties left, the job needs 3.*org2"):
            connect(load_job(_job(tmp_path / "all", addresses, deadline_s=2)), log=lambda m: None)
    report = (run_dir / "report.md").read_text()
    assert "DEGRADED: party org2 was not reached at the start" in report


# --- a party answers garbage ------------------------------------------------------------------


class NaNModel(nn.Module):
    """A broken model: NaN for every class."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return torch.full((x.shape[0], 10), float("nan")) * self.scale


def test_a_party_answering_nan_is_quarantined_and_never_trained_on(teachers, tmp_path):
    policy = Policy(predict=PredictPolicy(output="probs"), max_batch=64)
    handlers = [
        tiny_handler(tmp_path, policy, name=f"org{k}", classes=DIGIT_NAMES, model=model)
        for k, model in enumerate([*teachers[:2], NaNModel()])
    ]
    with serving(handlers[0]) as a, serving(handlers[1]) as b, serving(handlers[2]) as c:
        spec = load_job(_job(tmp_path, {"org0": a, "org1": b, "org2": c}, min_parties=2))
        run_dir = run_job(spec, connect(spec), progress=False, log=lambda message: None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "NaN or infinite" in metrics["extra"]["dropped_parties"]["org2"]
    assert "teacher:org2" not in metrics["results"]
    assert metrics["results"]["student"] > 0.8  # trained on the two healthy teachers only


# --- the coordinator dies mid-job -------------------------------------------------------------


def _fuse(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "amalgam.server.cli", "fuse", "--insecure", "--quiet", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def _charged(handler, decision: str = "granted") -> int:
    """The samples of the Predict calls the party's audit log shows with ``decision``."""
    records = read_records(handler.audit.path)
    return sum(
        r["samples"] for r in records if (r["method"], r["decision"]) == ("Predict", decision)
    )


def _progress(runs: Path, job_id: str) -> int:
    """How far a job has come: the party answers its store recorded plus the student's
    epochs checkpointed."""
    with closing(sqlite3.connect(runs / "jobs.sqlite")) as db:
        query = "SELECT COUNT(*) FROM answers WHERE job_id = ?"
        answers = db.execute(query, (job_id,)).fetchone()[0]
    checkpoint = runs / job_id / "checkpoints" / "student.pt"
    epochs = len(torch.load(checkpoint, weights_only=True)["history"]) if checkpoint.exists() else 0
    return answers + epochs


KILLS = 10


def test_a_coordinator_killed_at_ten_random_points_resumes_to_the_same_result_paying_once(
    teachers, tmp_path
):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    policy = Policy(predict=PredictPolicy(output="probs"), max_batch=64)
    handlers = {
        name: tiny_handler(tmp_path / name, policy, name=name, classes=DIGIT_NAMES, model=model)
        for name, model in zip(["org0", "org1", "org2"], teachers)
    }
    epochs = 12
    overrides = {"student": {"arch": "small_cnn", "epochs": epochs, "batch_size": 32}}
    with ExitStack() as stack:
        addresses = {name: stack.enter_context(serving(h)) for name, h in handlers.items()}
        # an uninterrupted run, for reference
        reference = _fuse(str(_job(tmp_path / "ref", addresses, **overrides)), env=env)
        assert reference.wait(timeout=600) == 0, reference.stderr.read()
        charged = {name: _charged(h) for name, h in handlers.items()}
        with closing(sqlite3.connect(tmp_path / "ref" / "runs" / "jobs.sqlite")) as db:
            answers = db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        # the same job, killed (SIGKILL) at 10 random points, half while it gathers the
        # parties' answers, half while it trains, and resumed after each
        draw = random.Random(0)
        gather = draw.sample(range(1, answers), KILLS // 2)
        training = draw.sample(range(answers + 1, answers + epochs), KILLS - KILLS // 2)
        runs = tmp_path / "cut" / "runs"
        job_file, job_id = _job(tmp_path / "cut", addresses, **overrides), None
        for point in sorted(gather) + sorted(training):
            if job_id is None:
                process = _fuse(str(job_file), env=env)
                job_id = re.match(r"job (\S+) in", process.stdout.readline()).group(1)
            else:
                process = _fuse("--resume", job_id, "--runs", str(runs), env=env)
            reached = _wait_for(
                lambda at=point, job=job_id: _progress(runs, job) >= at, timeout_s=300
            )
            process.kill()
            assert process.wait(timeout=30) == -signal.SIGKILL, process.stderr.read()
            assert reached and JobStore.beside(runs).get(job_id).status == "running"
        resumed = _fuse("--resume", job_id, "--runs", str(runs), env=env)
        assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    results = {
        name: json.loads(next((tmp_path / name / "runs").glob("resilience-*/metrics.json"))
                         .read_text())["results"]
        for name in ("ref", "cut")
    }  # fmt: skip
    assert results["cut"] == results["ref"]  # bit for bit: the resumed training is the same
    for name, handler in handlers.items():  # each sample paid once per job, never twice
        assert _charged(handler) == 2 * charged[name]
        print(f"{name}: {charged[name]} samples charged per job; chunks in flight at a kill "
              f"answered again uncharged: {_charged(handler, 'replayed')} samples")  # fmt: skip
    assert JobStore.beside(runs).get(job_id).status == "done"
    assert not (runs / job_id / "checkpoints").exists()


def test_a_job_failing_on_bad_input_after_paying_leaves_its_reason_and_no_run_folder(
    teachers, tmp_path
):
    policy = Policy(predict=PredictPolicy(output="probs"), max_batch=64)
    handler = tiny_handler(tmp_path, policy, name="org0", classes=DIGIT_NAMES, model=teachers[0])
    bad_student = {"student": {"arch": "mlp", "kwargs": {"depth": 3}}}  # mlp has no depth
    store = JobStore(tmp_path / "runs" / "jobs.sqlite")
    with serving(handler) as address:
        spec = load_job(_job(tmp_path, {"org0": address}, **bad_student))
        job = store.create(spec)
        for attempt in ("first", "resumed"):
            with pytest.raises(ValueError, match="student.arch: mlp: .*depth"):
                run_job(spec, connect(spec), progress=False, log=lambda m: None, store=store,
                        job=store.get(job.id))  # fmt: skip
            if attempt == "first":
                charged = _charged(handler)
    record = store.get(job.id)
    assert record.status == "failed" and "student.arch: mlp" in record.error
    assert not record.run_dir.exists()  # bad input: no half run folder
    assert charged == 314 + 540  # the unlabeled and the test images, paid for once ...
    assert _charged(handler) == charged  # ... and replayed from the store on the resume,
    assert _charged(handler, "replayed") == 0  # without asking the party again
