"""Append-only, hash-chained JSON-lines audit log of every call, granted or denied.

Each record carries ``prev`` (the previous record's hash) and ``hash`` (SHA-256 of the record
without its hash), so removing or editing a line breaks the chain (:func:`verify_chain`).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
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


def verify_chain(records: list[dict[str, Any]]) -> bool:
    """True when every record's hash matches its content and links to the one before."""
    prev = GENESIS
    for record in records:
        body = {k: v for k, v in record.items() if k != "hash"}
        if record.get("prev") != prev or _digest(body) != record.get("hash"):
            return False
        prev = record["hash"]
    return True


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
            with self.path.open("a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
            self._prev = record["hash"]
