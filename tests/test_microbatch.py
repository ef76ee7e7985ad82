"""Dynamic batching (`embedx.microbatch`): requests queued while the function runs go together
into its next call, each gets its own outputs, errors reach the requests they belong to."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from embedx.microbatch import BatcherClosed, MicroBatcher


def _wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.002)


class Gate:
    """A batched function that records each call's items and blocks until let go."""

    def __init__(self):
        self.calls: list[list] = []
        self.release = threading.Event()

    def __call__(self, items):
        self.calls.append(list(items))
        self.release.wait(10)
        return [x * 10 for x in items]


def test_requests_queued_while_busy_run_together_and_get_their_own_outputs():
    gate = Gate()
    b = MicroBatcher(gate, max_items=64)
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(b.submit, [1])
        _wait_for(lambda: len(gate.calls) == 1)  # the function is busy with the first request
        later = [pool.submit(b.submit, [10 * i + j for j in range(i)]) for i in range(1, 6)]
        _wait_for(lambda: b.pending() == 5)
        gate.release.set()
        assert first.result() == [10]
        for i, f in enumerate(later, start=1):
            assert f.result() == [(10 * i + j) * 10 for j in range(i)]
    assert len(gate.calls) == 2 and sorted(gate.calls[1]) == sorted(10 * i + j for i in range(1, 6) for j in range(i))
    assert (b.calls, b.items) == (2, 16)
    b.close()


def test_max_items_bounds_a_call_but_never_splits_a_request():
    gate = Gate()
    b = MicroBatcher(gate, max_items=4)
    with ThreadPoolExecutor(5) as pool:
        pool.submit(b.submit, [0])
        _wait_for(lambda: len(gate.calls) == 1)
        sizes = [3, 2, 6, 1]
        futures = []
        for n in sizes:  # queued in this order
            futures.append(pool.submit(b.submit, list(range(n))))
            _wait_for(lambda: b.pending() == len(futures))
        gate.release.set()
        assert [len(f.result()) for f in futures] == sizes
    # after the first call: [3] (3 + 2 > 4), then [2] (2 + 6 > 4), then [6] alone (> 4), then [1]
    assert [len(c) for c in gate.calls] == [1, 3, 2, 6, 1]


def test_one_item_at_most_means_one_request_at_a_time():
    gate = Gate()
    gate.release.set()
    b = MicroBatcher(gate, max_items=1)
    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(lambda i: b.submit([i, i]), range(8)))
    assert out == [[i * 10, i * 10] for i in range(8)]
    assert all(len(c) == 2 for c in gate.calls) and len(gate.calls) == 8


def test_an_error_reaches_the_requests_of_that_call_only_and_the_thread_goes_on():
    def fn(items):
        if "bad" in items:
            raise ValueError("cannot embed bad")
        return [s.upper() for s in items]

    b = MicroBatcher(fn, max_items=1)
    with pytest.raises(ValueError, match="cannot embed bad"):
        b.submit(["bad"])
    assert b.submit(["ok"]) == ["OK"]
    assert b.submit([]) == []


def test_a_function_giving_too_few_outputs_is_an_error_not_a_misalignment():
    b = MicroBatcher(lambda items: items[:-1])
    with pytest.raises(RuntimeError, match="1 outputs for 2 items"):
        b.submit(["a", "b"])


def test_close_answers_what_is_queued_then_refuses():
    gate = Gate()
    b = MicroBatcher(gate)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(b.submit, [1])
        _wait_for(lambda: len(gate.calls) == 1)
        queued = pool.submit(b.submit, [2])
        _wait_for(lambda: b.pending() == 1)
        b.close()
        gate.release.set()
        assert first.result() == [10] and queued.result() == [20]
    with pytest.raises(BatcherClosed):
        b.submit([3])
    with pytest.raises(ValueError):
        MicroBatcher(gate, max_items=0)
