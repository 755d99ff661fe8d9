"""The two-stage Ctrl-C of a run that writes its results behind it (``predict``'s images, a
video's frames).

The main thread computes; a pool of writer threads puts each result in place with an atomic
write. A first Ctrl-C (a ``KeyboardInterrupt`` in the main thread) stops the computing, and the
caller then lets :meth:`TwoStageStop.finish` wait for the results already computed: they cost
a forward each, and writing them costs little. A second Ctrl-C during that wait abandons them:
the ``abort`` event is set (writers check it before they start a file), the pool is stopped
without waiting, and the caller removes the hidden temporaries of the writes cut short. Either
way no file is left half-written, so a rerun redoes exactly what is missing.

The helper installs no signal handler: Python's own (``signal.default_int_handler``) is what
turns Ctrl-C into ``KeyboardInterrupt``, and whatever handler was installed stays installed.
That handler runs in the main thread only, so elsewhere (a worker thread, a Ray actor's
thread) or under another ``SIGINT`` handler a second Ctrl-C cannot reach the wait:
:func:`second_ctrl_c_reaches_here` says so, the wait then simply finishes, and
:func:`abort_hint` words the notice without promising what a Ctrl-C cannot do.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Protocol


class _Pool(Protocol):
    def shutdown(self, wait: bool = True, cancel: bool = False) -> None: ...


def second_ctrl_c_reaches_here() -> bool:
    """Whether a Ctrl-C arrives in this thread as ``KeyboardInterrupt``: the main thread, with
    Python's default ``SIGINT`` handler installed."""
    return (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)


def abort_hint(them: str = "") -> str:
    """The end of the "finishing" notice: how to abandon the pending writes (``them``: what to
    call them, e.g. ``"them"``), or, where a Ctrl-C cannot reach the wait, that it cannot."""
    if second_ctrl_c_reaches_here():
        return f"Ctrl-C again to abort{' ' + them if them else ''}; no partial file is left"
    return "a second Ctrl-C cannot stop them here; no partial file is left"


class TwoStageStop:
    """The second stage of a Ctrl-C for the writes that ``writers`` (a ``DaemonPool``) holds.

    Use::

        stop = TwoStageStop(writers)  # writers skip a file once ``stop.abort`` is set
        try:
            ...  # compute, hand results to ``writers``
        except KeyboardInterrupt:  # the first Ctrl-C
            stop.finish(wait_for_writes, abandon_writes)
        finally:
            stop.close()  # waits for running writes, unless they were abandoned
    """

    def __init__(self, writers: _Pool) -> None:
        self.writers = writers
        self.abort = threading.Event()  # set by a second Ctrl-C: writers start no new file
        self.aborted = False

    def finish(self, wait: Callable[[], None], abandon: Callable[[], None]) -> bool:
        """Run ``wait`` (announce, then collect the pending writes). If a second Ctrl-C stops
        it: set ``abort``, stop the writers without waiting, and run ``abandon`` (count what
        was given up, remove its temporaries, say so). Returns whether it was abandoned.

        Other exceptions from ``wait`` propagate unchanged."""
        try:
            wait()
        except KeyboardInterrupt:
            self.aborted = True
            self.abort.set()
            self.writers.shutdown(wait=False, cancel=True)
            abandon()
        return self.aborted

    def close(self) -> None:
        """Stop the writers: drop the queued writes and wait for the running ones (no write is
        cut off halfway), unless a second Ctrl-C abandoned them."""
        self.writers.shutdown(wait=not self.aborted, cancel=True)
