"""The prefetch thread of the extraction loop: order, overlap, errors, shutdown."""

import itertools
import threading

import pytest

from embedx._prefetch import Prefetcher


def test_yields_every_batch_in_order_with_prepare_applied():
    with Prefetcher(iter(range(50)), lambda b: b * 10, "cpu", depth=3) as pf:
        assert list(pf) == [(i, i * 10) for i in range(50)]


def test_depth_zero_prepares_inline_without_a_thread():
    calls = []

    def prepare(b):
        calls.append(b)
        return -b

    pf = Prefetcher(iter(range(4)), prepare, "cpu", depth=0)
    it = iter(pf)
    assert next(it) == (0, 0) and calls == [0]  # nothing prepared ahead
    assert list(it) == [(1, -1), (2, -2), (3, -3)]
    assert pf._thread is None
    pf.close()


def test_negative_prefetch_is_refused_with_a_clear_error(tmp_path):
    from embedx.errors import InputError
    from embedx.extractor import ExtractConfig, extract

    (tmp_path / "imgs").mkdir()
    with pytest.raises(InputError, match="--prefetch must be 0"):
        extract(tmp_path / "imgs", tmp_path / "out", ExtractConfig(prefetch=-1, progress=False))


def test_prepares_the_next_batch_while_the_consumer_holds_this_one():
    # the consumer keeps batch 0 until prepare(batch 1) has run: only possible if preparing
    # happens on another thread while the consumer is busy (serially, this would time out)
    second_prepared = threading.Event()

    def prepare(b):
        if b == 1:
            second_prepared.set()
        return b

    with Prefetcher(iter(range(3)), prepare, "cpu", depth=1) as pf:
        it = iter(pf)
        assert next(it) == (0, 0)
        assert second_prepared.wait(timeout=30), "batch 1 was not prepared while batch 0 was held"
        assert [b for b, _ in it] == [1, 2]


def test_an_error_while_preparing_reaches_the_consumer_at_its_batch():
    def prepare(b):
        if b == 3:
            raise ValueError("bad batch 3")
        return b

    seen = []
    with Prefetcher(iter(range(10)), prepare, "cpu") as pf:
        with pytest.raises(ValueError, match="bad batch 3"):
            for b, _ in pf:
                seen.append(b)
    assert seen == [0, 1, 2]


def test_an_error_from_the_source_reaches_the_consumer():
    def source():
        yield 0
        raise RuntimeError("DataLoader worker exited unexpectedly")

    with Prefetcher(source(), lambda b: b, "cpu") as pf:
        with pytest.raises(RuntimeError, match="worker exited"):
            list(pf)


def test_close_stops_the_thread_of_an_endless_source():
    pf = Prefetcher(itertools.count(), lambda b: b, "cpu", depth=2)
    it = iter(pf)
    assert [next(it)[0] for _ in range(5)] == [0, 1, 2, 3, 4]
    pf.close(timeout=10)
    assert not pf._thread.is_alive()
