"""Call every party at once: wall time is that of the slowest party, not the sum."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def fan_out(fn: Callable[[T], R], items: Sequence[T], max_workers: int | None = None) -> list[R]:
    """``[fn(item) for item in items]``, run in parallel threads, results in input order.

    The first exception (in input order) is re-raised after every call has finished.
    """
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=max_workers or len(items)) as pool:
        futures = [pool.submit(fn, item) for item in items]
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
    return [f.result() for f in futures]
