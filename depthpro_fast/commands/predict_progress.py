"""``predict``'s progress: an image counts when its outputs are written, slow steps show.

The count is taken by the writer thread the moment an image's last file is in place (or its
write failed), not when the main thread next looks, which may be a whole forward later (a
2-image official run on a CPU showed 0/2 for minutes, then 2/2). Steps before the first image
(loading the model, the first forward and its warm-up) are shown as their own step on the bar,
with the seconds they have taken so far, refreshed by a ticker thread every ``tick`` seconds,
and leave one line with their time when they end.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any


class Progress:
    """The bar of a run. ``bar``: a tqdm-like object (``update``, ``set_postfix_str``,
    ``write``, ``close``); by default a tqdm on stderr, disabled when not ``enabled``."""

    def __init__(self, total: int, *, label: str = "", enabled: bool = True, bar: Any = None,
                 clock: Callable[[], float] = time.monotonic, tick: float = 1.0):
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="img", desc=label or "predict", disable=not enabled,
                       dynamic_ncols=True, file=sys.stderr)
        self.bar = bar
        self.enabled = enabled
        self.done = 0  # images counted (outputs written, or failed)
        self.steps: list[tuple[str, float]] = []  # (step, seconds) of the finished steps
        self._clock = clock
        self._tick = tick
        self._lock = threading.Lock()

    def image_done(self) -> None:
        """One image finished (its outputs written, or it failed); thread-safe."""
        with self._lock:
            self.done += 1
            self.bar.update(1)

    def write(self, text: str) -> None:
        """A line on stderr that does not tear the bar."""
        self.bar.write(text, file=sys.stderr)

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        """Show ``text`` and its elapsed seconds on the bar while the block runs; then one line
        ``text: N.N s`` (when enabled) and an entry in ``steps``."""
        start = self._clock()
        stop = threading.Event()

        def show() -> None:
            with self._lock:
                self.bar.set_postfix_str(f"{text} {self._clock() - start:.0f} s")

        ticker = None
        if self.enabled:
            show()
            def tick() -> None:
                while not stop.wait(self._tick):  # every tick until the step ends
                    show()

            ticker = threading.Thread(target=tick, name="depthpro-progress", daemon=True)
            ticker.start()
        try:
            yield
        finally:
            stop.set()
            if ticker is not None:
                ticker.join()
            seconds = self._clock() - start
            self.steps.append((text, seconds))
            if self.enabled:
                with self._lock:
                    self.bar.set_postfix_str("")
                self.write(f"{text}: {seconds:.1f} s")

    def close(self) -> None:
        self.bar.close()
