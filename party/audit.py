"""Append-only, hash-chained JSON-lines audit log of every call, granted or denied.

Each record carries ``prev`` (the previous record's hash) and ``hash`` (SHA-256 of the record
without its hash), so editing, removing or reordering a line breaks the chain at that line
(:func:`first_break`; ``amalgam audit verify``). Removing the last lines leaves a shorter
intact chain: that shows only against a head hash kept elsewhere. Each record is written and
flushed to the operating system before the call is answered, so it survives a crash of the
agent.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


def _digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


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
        body = {k: v for k, v in record.items() if k != "hash"}
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


def verify_file(path: str | Path) -> AuditReport:
    """Check the hash chain of an audit log file, naming the first line that breaks it."""
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
    return AuditReport(True, f"{path}: {len(records)} records, hash chain intact, head {head}")


class AuditLog:
    """Thread-safe appender; resumes the chain of an existing file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records = read_records(self.path)
        self._prev = records[-1]["hash"] if records else GENESIS
        self._lock = threading.Lock()

    def append(
        self,
        *,
        caller: str,
        method: str,
        decision: str,
        samples: int = 0,
        bytes_out: int = 0,
        request_id: str = "",
        reason: str = "",
    ) -> None:
        with self._lock:
            record = {
                "time": time.time(),
                "caller": caller,
                "method": method,
                "samples": samples,
                "bytes_out": bytes_out,
                "decision": decision,
                "request_id": request_id,
                "reason": reason,
                "prev": self._prev,
            }
            record["hash"] = _digest(record)
            with self.path.open("a") as f:  # closed, so flushed, before the call is answered
                f.write(json.dumps(record, sort_keys=True) + "\n")
            self._prev = record["hash"]
