"""A small pool of daemon worker threads (the decoders and writers of ``predict``).

``concurrent.futures.ThreadPoolExecutor`` joins its threads when the interpreter exits, so a
write that the user chose to abandon (a second Ctrl-C) would still hold the process for as long
as it takes. These threads are daemons: once the caller has given up on a task, nothing waits
for it. Tasks are plain callables; ``submit`` returns a standard ``Future``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class DaemonPool:
    """``n`` daemon threads running submitted callables in order of submission."""

    def __init__(self, n: int, name: str = "depthpro-worker"):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"a pool needs a positive number of threads, got {n!r}")
        self._tasks: queue.SimpleQueue[tuple[Future, Callable, tuple, dict] | None] = (
            queue.SimpleQueue())
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(n)]
        self._closed = False
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        if self._closed:
            raise RuntimeError("submit after shutdown")
        fut: Future = Future()
        self._tasks.put((fut, fn, args, kwargs))
        return fut

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            fut, fn, args, kwargs = task
            if not fut.set_running_or_notify_cancel():  # cancelled while queued
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 (handed to whoever waits on the future)
                fut.set_exception(e)
            else:
                fut.set_result(result)

    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        """Stop taking tasks; ``cancel`` drops the queued ones; ``wait`` joins the threads
        (running tasks finish). Without ``wait`` running tasks are abandoned to their thread."""
        if not self._closed:
            self._closed = True
            if cancel:
                while True:
                    try:
                        task = self._tasks.get_nowait()
                    except queue.Empty:
                        break
                    if task is not None:
                        task[0].cancel()
            for _ in self._threads:
                self._tasks.put(None)
        if wait:
            for t in self._threads:
                t.join()
