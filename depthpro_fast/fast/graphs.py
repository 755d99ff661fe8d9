"""CUDA-graph runner: capture a fixed-shape forward once, replay it per call.

``GraphRunner.run(key, fn, x)`` captures ``fn(static_x)`` the first time it sees ``key`` (after
``warmup`` eager runs on a side stream, which also let Triton compile its kernels and cuDNN
benchmark its algorithms: neither may happen during capture), then for every call copies ``x``
into the static input buffer, replays the graph and returns clones of the static outputs.

Threading: a runner serves one call at a time. Its static buffers are shared state, so ``run``
holds a lock from the input copy to the output clones, and the next call's input copy waits (on
the GPU) for the previous call's clones, whatever stream each caller uses. Two threads may share
a runner; they just take turns.

Fallback: when capture is impossible (CPU tensors, an op that synchronises with the host or is
otherwise not capturable, out of memory) the runner records why (``failures``), warns once and
runs ``fn`` eagerly for that key from then on.

Memory: all graphs of a runner share one memory pool; that is safe here because replays are
serialised by the lock and outputs are cloned before the lock is released. At most
``max_graphs`` graphs are kept (least recently used dropped first).
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

Outputs = Sequence[torch.Tensor | None]


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    static_in: torch.Tensor
    static_out: tuple[torch.Tensor | None, ...]
    keep_alive: tuple  # tensors the graph reads besides its input (e.g. weights): never freed


class GraphRunner:
    """Captures and replays CUDA graphs of ``fn(x) -> tuple of tensors (or None)``."""

    def __init__(self, *, max_graphs: int = 4, warmup: int = 2, clone_outputs: bool = True):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (capture needs compiled kernels), got {warmup}")
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.clone_outputs = clone_outputs
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self.failures: dict[Hashable, str] = {}
        self._lock = threading.Lock()
        self._pool = None
        self._last_done: torch.cuda.Event | None = None
        self.replays = 0
        self.captures = 0

    def reset(self) -> None:
        """Drop every graph (e.g. after the weights changed)."""
        with self._lock:
            self._entries.clear()
            self.failures.clear()
            self._pool = None
            self._last_done = None

    @property
    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def run(self, key: Hashable, fn: Callable[[torch.Tensor], Outputs], x: torch.Tensor,
            keep_alive: Callable[[], tuple] | None = None) -> tuple[torch.Tensor | None, ...]:
        """``fn(x)`` through the graph captured for ``key`` (captured now if new).

        ``keep_alive``: called at capture; the tensors it returns (weights the graph reads)
        are referenced as long as the graph lives, so their memory is never reused under it.
        """
        if x.device.type != "cuda":
            self.failures.setdefault(key, "not a CUDA tensor: CUDA graphs need a GPU")
            return tuple(fn(x))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                if key in self.failures:
                    return tuple(fn(x))
                entry = self._capture(key, fn, x, keep_alive)
                if entry is None:
                    return tuple(fn(x))
            else:
                self._entries.move_to_end(key)
            stream = torch.cuda.current_stream(x.device)
            if self._last_done is not None:
                stream.wait_event(self._last_done)
            entry.static_in.copy_(x)
            entry.graph.replay()
            if self.clone_outputs:
                outs = tuple(None if o is None else o.clone() for o in entry.static_out)
            else:
                outs = entry.static_out
            done = torch.cuda.Event()
            done.record(stream)
            self._last_done = done
            self.replays += 1
            return outs

    def _capture(self, key: Hashable, fn: Callable[[torch.Tensor], Outputs], x: torch.Tensor,
                 keep_alive: Callable[[], tuple] | None) -> _Entry | None:
        device = x.device
        try:
            static_in = torch.empty_like(x, memory_format=torch.contiguous_format)
            static_in.copy_(x)  # warm up on real data, never on uninitialised memory
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    fn(static_in)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            # A private capture stream per attempt: a failed capture cannot leave torch's shared
            # default capture stream in a bad state. "thread_local": other threads of the
            # process may keep using CUDA while this one captures (they never touch this
            # stream); unsafe calls from this thread still fail the capture.
            capture_stream = torch.cuda.Stream(device=device)
            with torch.cuda.graph(graph, pool=self._pool, stream=capture_stream,
                                  capture_error_mode="thread_local"):
                static_out = tuple(fn(static_in))
        except Exception as e:  # anything: the eager path still works
            why = f"capture failed: {type(e).__name__}: {e}"
            self.failures[key] = why
            warnings.warn(f"CUDA graph for {key!r} not used, running eagerly ({why})",
                          RuntimeWarning, stacklevel=4)
            try:
                torch.cuda.synchronize(device)
            except Exception:  # the error may be sticky; the eager call will say so
                pass
            self._pool = None  # do not reuse a pool a failed capture may have left in use
            return None
        entry = _Entry(graph, static_in, static_out,
                       tuple(keep_alive()) if keep_alive is not None else ())
        self._entries[key] = entry
        self.captures += 1
        while len(self._entries) > self.max_graphs:
            self._entries.popitem(last=False)
        return entry

    def status(self) -> dict:
        return {"graphs": [repr(k) for k in self._entries], "captures": self.captures,
                "replays": self.replays,
                "failures": {repr(k): v for k, v in self.failures.items()}}
