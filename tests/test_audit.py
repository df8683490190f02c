"""party/audit.py: the append-only, hash-chained JSON-lines audit log."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from amalgam.party.audit import GENESIS, AuditLog, _digest, read_records, verify_chain
from amalgam.server.cli import main

FIELDS = {"time", "caller", "method", "samples", "bytes_out", "decision"}


def _fill(log: AuditLog, n: int, caller: str = "alice") -> None:
    for i in range(n):
        log.append(
            caller=caller,
            method="Predict",
            decision="granted",
            samples=i,
            bytes_out=16 * i,
            request_id=f"r{i}",
        )


def _rewrite(path, records) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


@pytest.fixture
def log(tmp_path):
    return AuditLog(tmp_path / "logs" / "audit.jsonl")  # parent folder is created


def test_records_carry_the_documented_fields(log):
    log.append(
        caller="alice",
        method="Predict",
        decision="granted",
        samples=32,
        bytes_out=1280,
        request_id="req-1",
    )
    log.append(
        caller="mallory",
        method="Predict",
        decision="denied",
        samples=8,
        reason="Predict is not granted",
    )

    first, second = read_records(log.path)
    assert FIELDS <= set(first)
    assert (
        first["caller"],
        first["method"],
        first["samples"],
        first["bytes_out"],
        first["decision"],
        first["request_id"],
    ) == ("alice", "Predict", 32, 1280, "granted", "req-1")
    assert (
        second["caller"],
        second["decision"],
        second["samples"],
        second["bytes_out"],
        second["reason"],
    ) == ("mallory", "denied", 8, 0, "Predict is not granted")
    assert isinstance(first["time"], float)
    assert first["time"] <= second["time"]


def test_one_json_object_per_line_linked_by_hash(log):
    _fill(log, 4)
    lines = log.path.read_text().splitlines()
    assert len(lines) == 4
    records = [json.loads(line) for line in lines]
    assert records[0]["prev"] == GENESIS
    for before, after in zip(records[:-1], records[1:], strict=True):
        assert after["prev"] == before["hash"]
    assert len({r["hash"] for r in records}) == 4
    assert all(len(r["hash"]) == 64 for r in records)


def test_untouched_log_verifies(log):
    _fill(log, 5)
    assert verify_chain(read_records(log.path))


def test_empty_log_verifies(tmp_path):
    assert read_records(tmp_path / "missing.jsonl") == []
    assert verify_chain([])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("samples", 0),
        ("bytes_out", 999_999),
        ("caller", "bob"),
        ("decision", "denied"),
        ("time", 0.0),
        ("reason", "edited"),
    ],
)
def test_editing_a_middle_record_breaks_the_chain(log, field, value):
    _fill(log, 5)
    records = read_records(log.path)
    assert records[2][field] != value
    records[2][field] = value
    _rewrite(log.path, records)
    assert not verify_chain(read_records(log.path))


def test_editing_and_rehashing_a_record_breaks_the_link_to_the_next(log):
    _fill(log, 5)
    records = read_records(log.path)
    body = {k: v for k, v in records[2].items() if k != "hash"}
    body["samples"] = 0
    records[2] = {**body, "hash": _digest(body)}  # self-consistent, but the next `prev` is stale
    assert not verify_chain(records)


@pytest.mark.parametrize("index", [0, 2])
def test_deleting_a_record_breaks_the_chain(log, index):
    _fill(log, 5)
    lines = log.path.read_text().splitlines(keepends=True)
    del lines[index]
    log.path.write_text("".join(lines))
    assert not verify_chain(read_records(log.path))


def test_reordering_records_breaks_the_chain(log):
    _fill(log, 4)
    records = read_records(log.path)
    records[1], records[2] = records[2], records[1]
    assert not verify_chain(records)


def test_a_new_log_on_an_existing_file_continues_the_chain(log):
    _fill(log, 3)
    last = read_records(log.path)[-1]["hash"]

    reopened = AuditLog(log.path)
    reopened.append(caller="bob", method="Describe", decision="granted")
    _fill(reopened, 2, caller="carol")

    records = read_records(log.path)
    assert len(records) == 6
    assert records[3]["prev"] == last
    assert [r["caller"] for r in records] == ["alice"] * 3 + ["bob"] + ["carol"] * 2
    assert verify_chain(records)


def test_concurrent_appends_keep_a_valid_chain(log):
    threads, per_thread = 8, 50
    barrier = threading.Barrier(threads)

    def work(t: int) -> None:
        barrier.wait()  # start together to maximize interleaving
        for i in range(per_thread):
            log.append(caller=f"t{t}", method="Predict", decision="granted", samples=i)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    records = read_records(log.path)
    assert len(records) == threads * per_thread
    assert verify_chain(records)
    for t in range(threads):
        mine = [r["samples"] for r in records if r["caller"] == f"t{t}"]
        assert mine == list(range(per_thread))  # each thread's records, all of them, in order


# --- amalgam audit verify --------------------------------------------------------------------


def _verify(path, capsys) -> tuple[int, str]:
    code = main(["audit", "verify", str(path)])
    return code, capsys.readouterr().out.strip()


def test_verify_reports_an_intact_log_with_its_head(log, capsys):
    _fill(log, 4)
    code, out = _verify(log.path, capsys)
    assert code == 0
    head = read_records(log.path)[-1]["hash"]
    assert out == (
        f"{log.path}: 4 records, hash chain intact, head {head} (without the key a recomputed "
        "chain or a removed tail would not show)"
    )


def _edit(lines):
    lines[2] = lines[2].replace('"samples": 2', '"samples": 0')


def _remove_second(lines):
    del lines[1]


def _remove_first(lines):
    del lines[0]


def _move_second_down(lines):
    lines.insert(3, lines.pop(1))


def _garble_fifth(lines):
    lines[4] = "{not json"


@pytest.mark.parametrize(
    ("tamper", "line", "what"),
    [
        (_edit, 3, "edited: its hash does not match its content"),
        (_remove_second, 2, "does not follow line 1: a line was removed"),
        (_remove_first, 1, "does not follow the start"),
        (_move_second_down, 2, "removed or lines reordered"),
        (_garble_fifth, 5, "not a JSON record"),
    ],
    ids=["edited", "removed", "first-removed", "reordered", "garbled"],
)
def test_verify_names_the_first_tampered_line(log, capsys, tamper, line, what):
    _fill(log, 6)
    lines = log.path.read_text().splitlines()
    tamper(lines)
    log.path.write_text("\n".join(lines) + "\n")
    code, out = _verify(log.path, capsys)
    assert code == 1
    assert out.startswith(f"{log.path}: line {line}: ") and what in out


def test_a_killed_agent_leaves_every_answered_call_in_its_log(tmp_path):
    """Each record is on disk before its call returns: a SIGKILL right after loses none."""
    path = tmp_path / "audit.jsonl"
    script = (
        "import os, signal, sys\n"
        "from party.audit import AuditLog\n"
        f"log = AuditLog({str(path)!r})\n"
        "for i in range(25):\n"
        "    log.append(caller='c', method='Predict', decision='granted', samples=i)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    process = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent.parent)
    assert process.returncode == -signal.SIGKILL
    records = read_records(path)
    assert [r["samples"] for r in records] == list(range(25))
    assert verify_chain(records)


# --- with the agent's key: tamper-evident end to end --------------------------------------------


def _rechain(lines):
    """Rewrite every record's hash chain from scratch, as someone without the key could."""
    from amalgam.party.audit import GENESIS, _digest

    prev = GENESIS
    for k, text in enumerate(lines):
        record = json.loads(text)
        record["samples"] = 0  # the edit the recomputed chain is meant to hide
        body = {key: v for key, v in record.items() if key not in ("hash", "mac")}
        body["prev"] = prev
        body["hash"] = prev = _digest({**body})
        lines[k] = json.dumps({**body, "mac": record["mac"]}, sort_keys=True)


def _rechain_without_macs(lines):
    _rechain(lines)
    for k, text in enumerate(lines):
        record = json.loads(text)
        del record["mac"]
        lines[k] = json.dumps(record, sort_keys=True)


KEYED = [
    (lambda lines: _edit(lines), "line 3: edited"),
    (lambda lines: lines.pop(3), "line 4: does not follow line 3"),
    (lambda lines: lines.pop(), "ends at line 5, its seal names 6 records: lines were removed"),
    (lambda lines: lines.clear(), "ends at line 0, its seal names 6 records"),
    (lambda lines: lines.insert(2, lines.pop(4)), "line 3: does not follow line 2"),
    (_rechain, "line 2: its MAC does not match: edited, or the chain recomputed"),  # 1: same
    (_rechain_without_macs, "line 1: its MAC does not match"),
]


@pytest.mark.parametrize(("tamper", "what"), KEYED,
                         ids=["edit", "delete-middle", "delete-tail", "truncate", "reorder",
                              "recompute", "recompute-no-macs"])  # fmt: skip
def test_with_the_key_every_tampering_is_detected(tmp_path, capsys, tamper, what):
    from amalgam.party.audit import load_key

    key_file = tmp_path / "audit.key"
    log = AuditLog(tmp_path / "audit.jsonl", load_key(key_file, create=True))
    _fill(log, 6)
    assert main(["audit", "verify", str(log.path), "--key", str(key_file)]) == 0
    assert "6 records, hash chain, MACs and seal intact" in capsys.readouterr().out
    lines = log.path.read_text().splitlines()
    tamper(lines)
    log.path.write_text("".join(line + "\n" for line in lines))
    assert main(["audit", "verify", str(log.path), "--key", str(key_file)]) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"{log.path}: ") and what in out


def test_with_the_key_a_missing_seal_or_a_foreign_key_is_detected(tmp_path, capsys):
    from amalgam.party.audit import load_key, seal_path

    log = AuditLog(tmp_path / "audit.jsonl", load_key(tmp_path / "audit.key", create=True))
    _fill(log, 3)
    other = tmp_path / "other.key"
    load_key(other, create=True)
    assert main(["audit", "verify", str(log.path), "--key", str(other)]) == 1
    assert "line 1: its MAC does not match" in capsys.readouterr().out
    seal_path(log.path).unlink()
    assert main(["audit", "verify", str(log.path), "--key", str(tmp_path / "audit.key")]) == 1
    assert "no readable seal" in capsys.readouterr().out
    reopened = AuditLog(log.path, load_key(tmp_path / "audit.key"))  # an agent restarts
    reopened.append(caller="c", method="Describe", decision="granted")
    assert main(["audit", "verify", str(log.path), "--key", str(tmp_path / "audit.key")]) == 0
    assert oct((tmp_path / "audit.key").stat().st_mode & 0o777) == "0o600"
