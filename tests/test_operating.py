"""Operating jobs from the command line: --json results, the job store's ls/show/log/stop,
--set overrides, every error of a file at once, log levels and progress off a terminal."""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
import yaml
from parties import tiny_handler

from amalgam.fusion import progress
from amalgam.fusion.data import DIGIT_NAMES
from amalgam.protocol.schemas import Policy, PredictPolicy
from amalgam.server.cli import main
from amalgam.server.job import load_job
from amalgam.server.simulation.parties import serving
from amalgam.server.store import JobStore

ROOT = Path(__file__).resolve().parent.parent
POLICY = Policy(predict=PredictPolicy(output="probs"), max_batch=128)


def _job(folder: Path, addresses: dict[str, str], epochs: int = 2) -> Path:
    job = {
        "name": "ops",
        "parties": [{"name": n, "address": a} for n, a in addresses.items()],
        # the parties' tiny models are untrained: keep every pseudo-label
        "method": {"name": "composition", "params": {"entropy_threshold": 1.0}},
        "student": {"arch": "mlp", "kwargs": {"hidden": 16}, "epochs": epochs},
        "data": {"unlabeled": "digits:public", "test": "digits:test"},
        "output_dir": str(folder / "runs"),
        "baselines": False,
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _json(capsys) -> object:
    return json.loads(capsys.readouterr().out)


def test_a_job_in_json_and_the_store_listing_showing_and_logging_it(tmp_path, capsys):
    handler = tiny_handler(tmp_path, POLICY, name="acme", classes=DIGIT_NAMES)
    runs = str(tmp_path / "runs")
    with serving(handler) as address:
        job = _job(tmp_path, {"acme": address})
        assert main(["fuse", str(job), "--insecure", "-q", "--json", "--set", "seed=3"]) == 0
    captured = capsys.readouterr()
    done = json.loads(captured.out)  # stdout holds the JSON document only
    assert done["status"] == "done" and 0 < done["results"]["student"] <= 1
    assert f"job {done['job_id']} in" in captured.err
    run_dir = Path(done["run_dir"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    confusion = metrics["confusion"]
    assert confusion["class_names"] == DIGIT_NAMES
    assert sum(map(sum, confusion["matrix"])) == 540  # every test image, once
    correct = sum(confusion["matrix"][k][k] for k in range(10))
    assert abs(correct / 540 - done["results"]["student"]) < 1e-6  # the same student
    page = (run_dir / "report.html").read_text()
    pictures = sorted(p.name for p in run_dir.glob("*.png"))
    assert pictures == ["accuracy.png", "confusion.png"]
    assert page.count('src="data:image/png;base64,') == len(pictures)  # self-contained
    assert (
        "Accuracy per class" in page and "Accuracy per class" in (run_dir / "report.md").read_text()
    )
    assert main(["jobs", "ls", "--runs", runs, "--json"]) == 0
    [listed] = _json(capsys)
    assert (listed["id"], listed["state"], listed["method"]) == (
        done["job_id"],
        "done",
        "composition",
    )
    assert main(["jobs", "show", done["job_id"], "--runs", runs, "--json"]) == 0
    shown = _json(capsys)
    assert shown["results"] == done["results"] and shown["spec"]["seed"] == 3  # --set applied
    assert shown["answers"]["acme"]["recorded"] == 3 + 5  # 314 and 540 images, 128 a call
    assert main(["jobs", "log", done["job_id"], "--runs", runs]) == 0
    log = capsys.readouterr().out
    assert "computing on cpu" in log and log.rstrip().endswith(f"job {done['job_id']}: done")
    assert main(["jobs", "show", "nope", "--runs", runs]) == 2
    assert "no job 'nope'" in capsys.readouterr().err


def test_every_problem_of_a_job_file_is_one_line_each(tmp_path, capsys):
    job = _job(tmp_path, {"acme": "127.0.0.1:1"})
    assert main(["fuse", str(job), "--set", "seed=x", "--set", "student.epochs=-"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[3] for line in lines] == ["seed", "student.epochs"]
    assert all(line.startswith(f"amalgam: error: {job}: ") for line in lines)
    assert main(["plan", str(job), "--set", "nonsense"]) == 2
    assert "--set nonsense: expected key.path=value" in capsys.readouterr().err


def test_a_running_job_is_stopped_and_stays_resumable(tmp_path):
    handler = tiny_handler(tmp_path, POLICY, name="acme", classes=DIGIT_NAMES)
    runs = tmp_path / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with serving(handler) as address:
        job = _job(tmp_path, {"acme": address}, epochs=10_000)
        command = [sys.executable, "-m", "amalgam.server.cli", "fuse", str(job), "--insecure"]
        fuse = subprocess.Popen([*command, "-q"], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        job_id = re.match(r"job (\S+) in", fuse.stdout.readline()).group(1)
        checkpoint = runs / job_id / "checkpoints" / "student.pt"
        deadline = time.monotonic() + 300
        while not checkpoint.exists() and fuse.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert checkpoint.exists(), fuse.stderr.read()
        assert JobStore.beside(runs).get(job_id).state == "running"
        assert main(["jobs", "stop", job_id, "--runs", str(runs)]) == 0
        assert fuse.wait(timeout=60) == 143
        assert "stopped (SIGTERM)" in fuse.stderr.read()
        stopped = JobStore.beside(runs).get(job_id)
        assert stopped.state == "stopped" and checkpoint.exists()
        assert main(["jobs", "stop", job_id, "--runs", str(runs)]) == 1  # not running now


def test_a_killed_job_shows_as_interrupted(tmp_path):
    store = JobStore.beside(tmp_path / "runs")
    job = store.create(load_job(_job(tmp_path, {"acme": "127.0.0.1:1"})))
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    with closing(sqlite3.connect(store.path)) as db, db:
        db.execute("UPDATE jobs SET pid = ? WHERE id = ?", (gone.pid, job.id))
    assert store.get(job.id).state == "interrupted"
    store.claim(job.id)  # this process: alive
    assert store.get(job.id).state == "running"


def test_progress_off_a_terminal_is_whole_lines_with_percent_rate_and_eta(monkeypatch, caplog):
    monkeypatch.setattr(progress, "LINE_PERIOD_S", 0.0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    with caplog.at_level(logging.INFO, logger="amalgam.progress"):
        bar = progress.progress_bar(4, "train student", unit="epoch")
        assert isinstance(bar, progress.LineProgress)
        for _ in range(4):
            time.sleep(0.01)
            bar.update(1)
            bar.set_postfix(loss="0.5")
        bar.close()
    lines = [record.getMessage() for record in caplog.records]
    assert lines, "no progress line"
    assert all(re.match(r"train student: \d+% \(\d/4 epoch\), .*ETA", line) for line in lines)
    assert lines[-1].startswith("train student: 100% (4/4 epoch)") and "loss=0.5" in lines[-1]
    assert progress.progress_bar(4, "x", show=False).disable


@pytest.mark.parametrize(
    "flag, level, grpc", [("-q", logging.WARNING, "NONE"), (None, logging.INFO, "NONE"),
                          ("-v", logging.DEBUG, "DEBUG")],
)  # fmt: skip
def test_log_levels_and_grpcs_own_log(tmp_path, capsys, monkeypatch, flag, level, grpc):
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    job = _job(tmp_path, {"acme": "127.0.0.1:1"})
    assert main(["plan", str(job), *([flag] if flag else [])]) == 2  # no --insecure
    assert logging.getLogger("amalgam").level == level
    assert os.environ["GRPC_VERBOSITY"] == grpc


def test_one_host_federation_files_run_as_they_are(tmp_path, capsys):
    from amalgam.party.config import load_party_config
    from amalgam.party.handler import PartyHandler
    from amalgam.party.service import create_server
    from amalgam.protocol.tls import server_credentials
    from amalgam.server.simulation.demo_parties import PARTY_PORT

    assert main(["demo", "--prepare", str(tmp_path / "federation"), "--one-host"]) == 0
    out = capsys.readouterr().out
    configs = re.findall(r"amalgam party serve --config (\S+)", out)
    job_file = re.search(r"amalgam fuse (\S+)", out).group(1)
    spec = load_job(job_file)
    listen = {c.name: c.address for c in map(load_party_config, configs)}
    assert listen == {p.name: p.address for p in spec.parties}  # each party where the job calls
    written = [f"127.0.0.1:{PARTY_PORT + k}" for k in range(3)]  # what the files say, unbound
    assert sorted(listen.values()) == written
    servers, moved = [], []
    try:
        for config_file in configs:  # here on free ports, as tests must
            config = load_party_config(config_file, ["address=127.0.0.1:0"])
            server = create_server(PartyHandler.from_config(config), config.address,
                                   credentials=server_credentials(config.tls))  # fmt: skip
            server.start()
            servers.append(server)
            position = [p.name for p in spec.parties].index(config.name)
            moved += ["--set", f"parties.{position}.address=127.0.0.1:{server.port}"]
        assert main(["fuse", job_file, "-q", "--json", "--set", "student.epochs=2", *moved]) == 0
    finally:
        for server in servers:
            server.stop(None)
    assert json.loads(capsys.readouterr().out)["status"] == "done"
