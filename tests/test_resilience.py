"""Failures on either side lose nothing: a party killed mid-job is dropped and the job finishes
degraded (or stops naming it, below min_parties); a party answering NaN is quarantined; a
coordinator killed mid-job resumes from its job store with the same result and without
charging any party twice."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
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
    answer_once = teacher._predict_once

    def answer_then_die(x):
        out = answer_once(x)
        if not killed:
            process.process.kill()
            process.process.wait()
            killed["at"] = time.monotonic()
        return out

    teacher._predict_once = answer_then_die


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


def _predict_samples(handler) -> int:
    return sum(
        r["samples"]
        for r in read_records(handler.audit.path)
        if r["method"] == "Predict" and r["decision"] == "granted"
    )


def test_a_killed_coordinator_resumes_to_the_same_result_without_charging_twice(teachers, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    policy = Policy(predict=PredictPolicy(output="probs"), max_batch=64)
    handlers = {
        name: tiny_handler(tmp_path / name, policy, name=name, classes=DIGIT_NAMES, model=model)
        for name, model in zip(["org0", "org1", "org2"], teachers)
    }
    with ExitStack() as stack:
        addresses = {name: stack.enter_context(serving(h)) for name, h in handlers.items()}
        overrides = {"student": {"arch": "small_cnn", "epochs": 40, "batch_size": 32}}
        # an uninterrupted run, for reference
        reference = _fuse(str(_job(tmp_path / "ref", addresses, **overrides)), env=env)
        assert reference.wait(timeout=600) == 0, reference.stderr.read()
        charged = {name: _predict_samples(h) for name, h in handlers.items()}
        # the same job, killed once its student has a checkpoint
        interrupted = _fuse(str(_job(tmp_path / "cut", addresses, **overrides)), env=env)
        first = interrupted.stdout.readline()
        job_id = re.match(r"job (\S+) in (\S+)", first).group(1)
        checkpoint = tmp_path / "cut" / "runs" / job_id / "checkpoints" / "student.pt"
        assert _wait_for(checkpoint.exists, timeout_s=300)
        interrupted.send_signal(signal.SIGKILL)
        interrupted.wait(timeout=30)
        assert JobStore.beside(tmp_path / "cut" / "runs").get(job_id).status == "running"
        resumed = _fuse("--resume", job_id, "--runs", str(tmp_path / "cut" / "runs"), env=env)
        assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    runs = {
        name: next((tmp_path / name / "runs").glob("resilience-*/metrics.json"))
        for name in ("ref", "cut")
    }
    results = {name: json.loads(path.read_text())["results"] for name, path in runs.items()}
    assert results["cut"] == results["ref"]  # bit for bit: the resumed training is the same
    for name, handler in handlers.items():
        assert _predict_samples(handler) == 2 * charged[name]  # once per job, never twice
    assert JobStore.beside(tmp_path / "cut" / "runs").get(job_id).status == "done"
    assert not (tmp_path / "cut" / "runs" / job_id / "checkpoints").exists()
