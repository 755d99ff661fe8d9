"""A CPU stand-in for the CUDA primitives of the graph runner (``fast/graph_backend.py``).

``FakeGraphs`` runs ``GraphRunner``'s own logic (static buffers, LRU, thrash, failures, stream
ownership) on CPU tensors: a "graph" records ``fn`` at capture and replays it by computing
``fn(static_in)`` again and writing the result into the static outputs, as a CUDA graph writes
into the memory it captured. Streams come from a round-robin pool like torch's (32 per device):
``FakeStreamPool``; each pool has its own handles, so tests never share one by accident.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator

import torch

_bases = itertools.count(1)


class FakeStream:
    def __init__(self, handle: int):
        self.cuda_stream = handle
        self.waited: list = []

    def wait_stream(self, other: FakeStream) -> None:
        self.waited.append(other)

    def wait_event(self, event: FakeEvent) -> None:
        self.waited.append(event)

    def __repr__(self) -> str:
        return f"FakeStream({self.cuda_stream:#x})"


class FakeStreamPool:
    """``size`` streams handed out round-robin, like ``torch.cuda.Stream()`` (a new object per
    call, wrapping one of the pool's CUDA streams)."""

    def __init__(self, size: int = 32):
        self.size = size
        self.base = next(_bases) << 16
        self.drawn = 0

    def __call__(self, device: torch.device | None = None, **_: object) -> FakeStream:
        stream = FakeStream(self.base + 1 + self.drawn % self.size)
        self.drawn += 1
        return stream

    def handle(self, index: int) -> int:
        return self.base + 1 + index % self.size


class FakeEvent:
    def record(self, stream: FakeStream) -> None:
        self.stream = stream


class FakeGraph:
    def __init__(self, fn: Callable, static_in: torch.Tensor, static_out: tuple):
        self.fn, self.static_in, self.static_out = fn, static_in, static_out
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        for out, new in zip(self.static_out, self.fn(self.static_in), strict=True):
            if out is not None:
                out.copy_(new)  # in place, as the real graph writes its captured memory


class FakeGraphs:
    """The runner's backend on a CPU. ``fails_on(static_in)``: True where the capture should
    raise, as an uncapturable op would."""

    def __init__(self, pool: FakeStreamPool | None = None,
                 fails_on: Callable[[torch.Tensor], bool] | None = None):
        self.pool = pool or FakeStreamPool()
        self.default = FakeStream(0)
        self.fails_on = fails_on
        self.current = self.default
        self.captures: list[dict] = []
        self.graphs: list[FakeGraph] = []

    def unsupported(self, x: torch.Tensor) -> str | None:
        return None

    def new_stream(self, device: torch.device) -> FakeStream:
        return self.pool(device)

    def current_stream(self, device: torch.device) -> FakeStream:
        return self.current

    @contextlib.contextmanager
    def use_stream(self, stream: FakeStream) -> Iterator[None]:
        before, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = before

    def new_event(self) -> FakeEvent:
        return FakeEvent()

    def new_pool(self) -> object:
        return object()

    def capture(self, fn: Callable, static_in: torch.Tensor, *, pool: object,
                stream: FakeStream) -> tuple[FakeGraph, tuple]:
        self.captures.append({"stream": stream, "inference_mode": torch.is_inference_mode_enabled(),
                              "static_in_inference": static_in.is_inference()})
        if self.fails_on is not None and self.fails_on(static_in):
            raise RuntimeError("operation not permitted when stream is capturing")
        with self.use_stream(stream):
            static_out = tuple(fn(static_in))
        graph = FakeGraph(fn, static_in, static_out)
        self.graphs.append(graph)
        return graph, static_out

    def synchronize(self, device: torch.device) -> None:
        pass
