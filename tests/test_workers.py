"""The daemon worker pool behind predict's decoders and writers."""

from __future__ import annotations

import threading

import pytest

from depthpro_fast.workers import DaemonPool


def test_results_errors_order_and_daemon_threads():
    pool = DaemonPool(2, "t")
    futures = [pool.submit(pow, 2, i) for i in range(10)]
    bad = pool.submit(int, "x")
    assert [f.result(5) for f in futures] == [2 ** i for i in range(10)]
    assert isinstance(bad.exception(5), ValueError)
    assert all(t.daemon for t in pool._threads)  # an abandoned task never holds up the exit
    pool.shutdown(wait=True)
    assert not any(t.is_alive() for t in pool._threads)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(pow, 2, 2)


def test_shutdown_cancels_queued_tasks_and_can_abandon_running_ones():
    gate, started = threading.Event(), threading.Event()

    def task():
        started.set()
        return gate.wait(30)

    pool = DaemonPool(1, "t")
    running = pool.submit(task)
    assert started.wait(5)
    queued = [pool.submit(pow, 2, i) for i in range(3)]
    pool.shutdown(wait=False, cancel=True)
    assert all(f.cancelled() for f in queued)
    assert not running.done()  # abandoned to its thread, not waited for
    gate.set()
    assert running.result(5) is True


def test_bad_size():
    for n in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="positive number of threads"):
            DaemonPool(n)
