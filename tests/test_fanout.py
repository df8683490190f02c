"""fan_out runs every call at once, keeps the input order and reports failures."""

from __future__ import annotations

import threading

import pytest

from amalgam.server.fanout import fan_out


def test_calls_run_concurrently_and_results_keep_input_order():
    barrier = threading.Barrier(5, timeout=10)  # breaks unless all five calls are in flight

    def call(i: int) -> int:
        barrier.wait()
        return i * i

    assert fan_out(call, [0, 1, 2, 3, 4]) == [0, 1, 4, 9, 16]


def test_first_failure_in_input_order_is_raised_after_all_calls_finish():
    finished = []

    def call(i: int) -> int:
        if i in (1, 3):
            raise ConnectionError(f"party {i} unreachable")
        finished.append(i)
        return i

    with pytest.raises(ConnectionError, match="party 1 unreachable"):
        fan_out(call, [0, 1, 2, 3])
    assert sorted(finished) == [0, 2]


def test_no_items_no_calls():
    assert fan_out(lambda i: i, []) == []
