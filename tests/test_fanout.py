"""fan_out runs the calls at once in a bounded pool, keeps the input order and reports
failures."""

from __future__ import annotations

import threading

import pytest

from amalgam.server.fanout import FANOUT_WORKERS, fan_out


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


def test_at_most_max_workers_calls_are_in_flight():
    lock, in_flight, most = threading.Lock(), [0], [0]
    release = threading.Event()

    def call(i: int) -> int:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            if most[0] == 4:  # the pool is full: let every call finish
                release.set()
        release.wait(timeout=10)
        with lock:
            in_flight[0] -= 1
        return i

    assert fan_out(call, list(range(40)), max_workers=4) == list(range(40))
    assert most[0] == 4 and release.is_set()


def test_the_default_pool_is_bounded_by_the_machine_not_the_parties():
    seen = set()
    barrier = threading.Barrier(FANOUT_WORKERS, timeout=10)

    def call(i: int) -> int:
        seen.add(threading.get_ident())
        if i < FANOUT_WORKERS:
            barrier.wait()  # the first FANOUT_WORKERS calls are in flight together
        return i

    assert fan_out(call, list(range(5 * FANOUT_WORKERS))) == list(range(5 * FANOUT_WORKERS))
    assert len(seen) == FANOUT_WORKERS
