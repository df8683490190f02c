"""Call every party at once: wall time is that of the slowest party, not the sum.

At most :data:`FANOUT_WORKERS` calls are in flight; the other parties wait their turn in the
pool's queue, so a market of a thousand parties does not start a thousand threads and a
thousand requests at once. A call's deadline starts when it is sent, not while it waits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# calls mostly wait on their parties, so several per core; enough for a few dozen parties at once
FANOUT_WORKERS = max(32, 8 * (os.cpu_count() or 1))


def fan_out(fn: Callable[[T], R], items: Sequence[T], max_workers: int | None = None) -> list[R]:
    """``[fn(item) for item in items]``, run in at most ``max_workers`` threads (default
    :data:`FANOUT_WORKERS`), results in input order.

    The first exception (in input order) is re-raised after every call has finished.
    """
    if not items:
        return []
    workers = min(len(items), max_workers or FANOUT_WORKERS)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fn, item) for item in items]
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
    return [f.result() for f in futures]
