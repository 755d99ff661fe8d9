"""The two-stage Ctrl-C (``depthpro_fast/interrupts.py``): a first Ctrl-C lets the pending
writes finish, a second abandons them; the SIGINT handler in place is left as it was; outside
the main thread the wait finishes and the notice promises no Ctrl-C.

Real signals: ``signal.raise_signal(SIGINT)`` runs Python's handler, which raises
``KeyboardInterrupt`` in the main thread, as a key press does.
"""

from __future__ import annotations

import signal
import threading

import pytest

from depthpro_fast.interrupts import TwoStageStop, abort_hint, second_ctrl_c_reaches_here


class FakePool:
    """Records ``shutdown`` calls (a ``DaemonPool`` in the real runs)."""

    def __init__(self) -> None:
        self.shutdowns: list[tuple[bool, bool]] = []

    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        self.shutdowns.append((wait, cancel))


@pytest.fixture
def default_handler():
    """Python's own SIGINT handler for the test (restored after, whatever ran)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def run_interrupted(stop: TwoStageStop, ctrl_c_while_waiting: bool) -> list[str]:
    """A run that a real first SIGINT stops, then ``stop.finish``; the events in order."""
    events: list[str] = []

    def wait() -> None:
        events.append("wait")
        if ctrl_c_while_waiting:
            signal.raise_signal(signal.SIGINT)  # the second Ctrl-C
            events.append("not reached")
        events.append("writes finished")

    def abandon() -> None:
        events.append(f"abandon (abort set: {stop.abort.is_set()}, "
                      f"pool stopped: {stop.writers.shutdowns})")

    try:
        try:
            signal.raise_signal(signal.SIGINT)  # the first Ctrl-C, mid-computation
            events.append("not reached")
        except KeyboardInterrupt:
            events.append(f"finish -> {stop.finish(wait, abandon)}")
    finally:
        stop.close()
    return events


def test_one_ctrl_c_finishes_the_pending_writes(default_handler):
    stop = TwoStageStop(FakePool())
    events = run_interrupted(stop, ctrl_c_while_waiting=False)
    assert events == ["wait", "writes finished", "finish -> False"]
    assert not stop.abort.is_set() and not stop.aborted
    assert stop.writers.shutdowns == [(True, True)]  # close waits for the running writes


def test_a_second_ctrl_c_abandons_them(default_handler):
    stop = TwoStageStop(FakePool())
    events = run_interrupted(stop, ctrl_c_while_waiting=True)
    # abort is set and the pool stopped without waiting before the caller cleans up
    assert events == ["wait", "abandon (abort set: True, pool stopped: [(False, True)])",
                      "finish -> True"]
    assert stop.aborted
    assert stop.writers.shutdowns == [(False, True), (False, True)]  # close does not wait


def test_other_errors_while_waiting_propagate(default_handler):
    stop = TwoStageStop(FakePool())

    def wait() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        stop.finish(wait, lambda: pytest.fail("not abandoned"))
    assert not stop.aborted and not stop.abort.is_set()


@pytest.mark.parametrize("twice", [False, True])
def test_the_sigint_handler_in_place_stays_in_place(twice):
    """No handler is installed or swapped: a program's own handler is the same object after
    either path (here one that raises KeyboardInterrupt, as a time limit's may)."""
    calls = []

    def own_handler(signum, frame):
        calls.append(signum)
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGINT, own_handler)
    try:
        assert not second_ctrl_c_reaches_here()  # not Python's handler: no promise
        stop = TwoStageStop(FakePool())
        events = run_interrupted(stop, ctrl_c_while_waiting=twice)
        assert events[-1] == f"finish -> {twice}"
        assert signal.getsignal(signal.SIGINT) is own_handler
        assert calls == [signal.SIGINT] * (2 if twice else 1)
    finally:
        signal.signal(signal.SIGINT, before)
    assert signal.getsignal(signal.SIGINT) is before


def test_the_notice_promises_a_second_ctrl_c_in_the_main_thread(default_handler):
    assert second_ctrl_c_reaches_here()
    assert abort_hint("them") == "Ctrl-C again to abort them; no partial file is left"
    assert abort_hint() == "Ctrl-C again to abort; no partial file is left"


def test_outside_the_main_thread_the_wait_finishes_and_the_notice_says_so(default_handler):
    """A run in another thread (a Ray actor's, a program's worker): a Ctrl-C goes to the main
    thread, so the wait cannot be stopped; nothing here touches signals (which would raise
    ValueError outside the main thread) and the notice does not promise it."""
    seen: dict[str, object] = {}

    def worker() -> None:
        try:
            seen["reaches"] = second_ctrl_c_reaches_here()
            seen["hint"] = abort_hint("them")
            stop = TwoStageStop(FakePool())
            try:
                raise KeyboardInterrupt  # e.g. raised by the caller's own code
            except KeyboardInterrupt:
                seen["aborted"] = stop.finish(lambda: None, lambda: None)
            finally:
                stop.close()
            seen["shutdowns"] = stop.writers.shutdowns
        except BaseException as e:  # noqa: BLE001 (reported to the test thread)
            seen["error"] = e

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert "error" not in seen, seen.get("error")
    assert seen == {"reaches": False,
                    "hint": "a second Ctrl-C cannot stop them here; no partial file is left",
                    "aborted": False, "shutdowns": [(True, True)]}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
