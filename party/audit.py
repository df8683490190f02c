"""Append-only, hash-chained JSON-lines audit log of every call, granted or denied.

Each record carries ``prev`` (the previous record's hash) and ``hash`` (SHA-256 of the record
without its hash), so editing, removing or reordering a line breaks the chain at that line
(:func:`first_break`; ``amalgam audit verify``). Each record is written and flushed to the
operating system before the call is answered, so it survives a crash of the agent.

With the agent's secret key (``audit_key``), the log is tamper-evident end to end, the way
CloudTrail signs its digest files: every record also carries ``mac``, an HMAC-SHA256 of its
hash under the key, so a chain recomputed without the key fails at its first line; and after
every record the agent rewrites ``<log>.seal`` (atomically): the record count and the head
hash under the key, so removing lines from the end, or every line, shows against the seal.

The log keeps one handle open, line-buffered: each record reaches the operating system as one
``write`` before the call is answered, without an open and a close per call.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amalgam.protocol.errors import bounded

GENESIS = "0" * 64
MAX_FIELD = 200  # characters kept of a caller's own strings (its name, its request id)


def _digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _mac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def seal_path(path: str | Path) -> Path:
    """Where the seal of the audit log at ``path`` is kept: ``<log>.seal``."""
    return Path(f"{path}.seal")


def load_key(path: str | Path, create: bool = False) -> bytes:
    """The secret key in the file at ``path`` (64 hex digits); with ``create`` a missing file
    is made with a fresh key, readable by its owner only. A bad key file raises ValueError."""
    path = Path(path)
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        descriptor = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:  # whole or not at all, and the first of two agents starting at once wins
            os.link(fresh, path)
        except FileExistsError:
            pass
        finally:
            fresh.unlink()
    try:
        return bytes.fromhex(path.read_text().strip())
    except OSError as error:
        raise ValueError(f"{path}: cannot read the audit key: {error.strerror}") from None
    except ValueError:
        raise ValueError(f"{path}: not an audit key (64 hex digits)") from None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def first_break(records: list[dict[str, Any]]) -> tuple[int, str] | None:
    """``(line, what is wrong)`` for the first record (1-based) that breaks the chain, or
    ``None`` when every record's hash matches its content and links to the one before."""
    prev = GENESIS
    for line, record in enumerate(records, start=1):
        body = {k: v for k, v in record.items() if k not in ("hash", "mac")}
        if _digest(body) != record.get("hash"):
            return line, "edited: its hash does not match its content"
        if record.get("prev") != prev:
            where = "the start" if line == 1 else f"line {line - 1}"
            return line, f"does not follow {where}: a line was removed or lines reordered"
        prev = record["hash"]
    return None


def verify_chain(records: list[dict[str, Any]]) -> bool:
    """True when every record's hash matches its content and links to the one before."""
    return first_break(records) is None


@dataclass(frozen=True)
class AuditReport:
    intact: bool
    message: str  # one line: the file and the record count and head, or the broken line


def _keyed_problem(records: list[dict[str, Any]], seal: Path, key: bytes) -> str | None:
    """What the key shows wrong in an intact chain: a record whose MAC does not match (the
    chain was rewritten), or a log that does not end where its seal says."""
    for line, record in enumerate(records, start=1):
        if not hmac.compare_digest(str(record.get("mac", "")), _mac(key, record["hash"])):
            return f"line {line}: its MAC does not match: edited, or the chain recomputed"
    try:
        sealed = json.loads(seal.read_text())
        count, head = int(sealed["records"]), str(sealed["head"])
        valid = hmac.compare_digest(str(sealed["mac"]), _mac(key, f"{count}:{head}"))
    except (OSError, ValueError, KeyError, TypeError):
        return f"{seal}: no readable seal: lines removed from the end would not show"
    if not valid:
        return f"{seal}: its MAC does not match: the seal was edited"
    if len(records) < count:
        return f"ends at line {len(records)}, its seal names {count} records: lines were removed"
    if len(records) > count:
        return f"line {count + 1}: written after the last seal (the agent stopped before it)"
    if (records[-1]["hash"] if records else GENESIS) != head:
        return f"line {count}: not the head its seal names"
    return None


def verify_file(path: str | Path, key: bytes | None = None) -> AuditReport:
    """Check the hash chain of an audit log file, naming the first line that breaks it; with
    the agent's ``key``, also every record's MAC and the seal (see the module docstring)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        return AuditReport(False, f"{path}: cannot read: {error.strerror}")
    records = []
    for line, text in enumerate(lines, start=1):
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            return AuditReport(False, f"{path}: line {line}: not a JSON record")
        records.append(record)
    broken = first_break(records)
    if broken is not None:
        return AuditReport(False, f"{path}: line {broken[0]}: {broken[1]}")
    head = records[-1]["hash"] if records else GENESIS
    if key is None:
        return AuditReport(True, f"{path}: {len(records)} records, hash chain intact, head {head} "
                           "(without the key a recomputed chain or a removed tail would not "
                           "show)")  # fmt: skip
    problem = _keyed_problem(records, seal_path(path), key)
    if problem is not None:
        return AuditReport(False, f"{path}: {problem}")
    return AuditReport(True, f"{path}: {len(records)} records, hash chain, MACs and seal intact, "
                       f"head {head}")  # fmt: skip


def spent_by_caller(records: list[dict[str, Any]]) -> dict[str, int]:
    """The budget each caller has spent: the ``charged`` units of its granted calls (a record
    written before ``charged`` existed counts its samples)."""
    spent: dict[str, int] = {}
    for record in records:
        if record.get("decision") == "granted":
            units = int(record.get("charged", record.get("samples", 0)))
            spent[record["caller"]] = spent.get(record["caller"], 0) + units
    return spent


class AuditLog:
    """Thread-safe appender; resumes the chain of an existing file. With ``key`` every record
    gets its MAC and the seal is rewritten after it (see the module docstring).

    Attributes
    ----------
    spent : per caller, the budget its granted calls in the file had charged when it was
        opened (:func:`spent_by_caller`): a restarted agent goes on from there.
    """

    def __init__(self, path: str | Path, key: bytes | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = key
        records = read_records(self.path)
        self._count = len(records)
        self._prev = records[-1]["hash"] if records else GENESIS
        self.spent = spent_by_caller(records)
        self._lock = threading.Lock()
        self._file = self.path.open("a", buffering=1)  # line-buffered: a record per write

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def append(
        self,
        *,
        caller: str,
        method: str,
        decision: str,
        samples: int = 0,
        charged: int = 0,
        bytes_out: int = 0,
        request_id: str = "",
        reason: str = "",
    ) -> None:
        with self._lock:
            record = {
                "time": time.time(),
                "caller": bounded(caller, MAX_FIELD),
                "method": method,
                "samples": samples,
                "charged": charged,
                "bytes_out": bytes_out,
                "decision": decision,
                "request_id": bounded(request_id, MAX_FIELD),
                "reason": bounded(reason),
                "prev": self._prev,
            }
            record["hash"] = _digest(record)
            if self._key is not None:
                record["mac"] = _mac(self._key, record["hash"])
            self._file.write(json.dumps(record, sort_keys=True) + "\n")  # flushed: a line
            self._prev = record["hash"]
            self._count += 1
            if self._key is not None:
                self._seal()

    def _seal(self) -> None:
        """Replace the seal with this count and head, under the key (write, then rename)."""
        head = f"{self._count}:{self._prev}"
        seal = {"records": self._count, "head": self._prev, "mac": _mac(self._key, head)}
        fresh = seal_path(self.path).with_suffix(".seal.tmp")
        fresh.write_text(json.dumps(seal) + "\n")
        fresh.replace(seal_path(self.path))
