"""CUDA-graph runner: capture a fixed-shape forward once, replay it per call.

``GraphRunner.run(key, fn, x)`` captures ``fn(static_x)`` the first time it sees ``key`` (after
``warmup`` eager runs on the runner's own stream, which also let Triton compile its kernels and
cuDNN benchmark its algorithms: neither may happen during capture), then for every call copies
``x`` into the static input buffer, replays the graph and returns clones of the static outputs.
The device primitives (streams, events, capture) and the static buffers are in
``fast/graph_backend.py``; a test passes a fake ``backend`` to run this logic on a CPU.

Inference mode: calls may come inside or outside ``torch.inference_mode()``, in any order; the
static buffers are normal tensors (``graph_backend.normal_tensors``), so a graph first captured
inside inference mode serves calls outside it and the reverse.

Streams: the runner draws one capture stream per device, once, and keeps it
(``fast/streams.py``: never a CUDA stream that another live engine or runner holds, such as an
engine's side stream); the warm-up runs on it too. Drawing a fresh ``torch.cuda.Stream()`` per
capture would cycle torch's pool of 32 streams into other owners' streams.

Threading: a runner serves one call at a time. Its static buffers are shared state, so ``run``
holds a lock from the input copy to the output clones, and the next call's input copy waits (on
the GPU) for the previous call's clones, whatever stream each caller uses. Two threads may share
a runner; they just take turns. Eager fallbacks run under the lock too: they use the engine's
side stream, which a capture on another thread must not record.

Fallback: when capture is impossible (CPU tensors, an op that synchronises with the host or is
otherwise not capturable, out of memory) the runner records why (``failures``), warns once and
runs ``fn`` eagerly for that key from then on.

Thrash: at most ``max_graphs`` graphs are kept (least recently used dropped first). With more
live shapes than that, each call of an evicted shape would capture again, and a capture
synchronises the device and empties the allocator's cache: slower than eager. A key captured
again after an eviction more than ``max_recaptures`` times is marked thrashing and runs eagerly
from then on (``thrashing``; one RuntimeWarning per runner; counts in ``status()``).

Memory: all graphs of a runner share one memory pool; that is safe here because replays are
serialised by the lock and outputs are cloned before the lock is released.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from . import streams
from .graph_backend import (
    CudaGraphs,
    Outputs,
    clone_out,
    copy_in,
    normal_tensors,
    static_input_like,
)


@dataclass
class _Entry:
    graph: Any  # torch.cuda.CUDAGraph (or the backend's)
    static_in: torch.Tensor
    static_out: tuple[torch.Tensor | None, ...]
    keep_alive: tuple  # tensors the graph reads besides its input (e.g. weights): never freed


@dataclass
class _KeyCounts:
    captures: int = 0
    recaptures: int = 0  # captures after an eviction of the key's graph
    evictions: int = 0
    evicted: bool = False  # its last graph was evicted (the next capture is a recapture)


class GraphRunner:
    """Captures and replays CUDA graphs of ``fn(x) -> tuple of tensors (or None)``."""

    def __init__(self, *, max_graphs: int = 4, warmup: int = 2, clone_outputs: bool = True,
                 max_recaptures: int = 2, backend: Any = None):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (capture needs compiled kernels), got {warmup}")
        if isinstance(max_recaptures, bool) or not isinstance(max_recaptures, int) \
                or max_recaptures < 0:
            raise ValueError(f"max_recaptures must be an integer >= 0, got {max_recaptures!r}")
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.clone_outputs = clone_outputs
        self.max_recaptures = max_recaptures
        self.backend = backend if backend is not None else CudaGraphs()
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self.failures: dict[Hashable, str] = {}
        self.thrashing: dict[Hashable, str] = {}
        self._counts: dict[Hashable, _KeyCounts] = {}
        self._streams: dict[torch.device, Any] = {}  # the capture stream per device, kept
        self._lock = threading.Lock()
        self._pool = None
        self._last_done: Any = None
        self._warned_thrash = False
        self.replays = 0
        self.captures = 0
        self.recaptures = 0
        self.evictions = 0
        self.eager_runs = 0

    def reset(self) -> None:
        """Drop every graph (e.g. after the weights changed). The capture streams and the
        per-key counts stay: thrashing is a property of the workload's shapes."""
        with self._lock:
            self._entries.clear()
            self.failures.clear()
            for counts in self._counts.values():
                counts.evicted = False
            self._pool = None
            self._last_done = None

    @property
    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def capture_stream(self, device: torch.device) -> Any | None:
        """This runner's capture stream on ``device`` (drawn once, then kept), or None when
        every stream of torch's pool is held by another engine or runner."""
        s = self._streams.get(device)
        if s is None:
            s = streams.own_stream(device, self, self.backend.new_stream)
            if s is not None:
                self._streams[device] = s
        return s

    def run(self, key: Hashable, fn: Callable[[torch.Tensor], Outputs], x: torch.Tensor,
            keep_alive: Callable[[], tuple] | None = None) -> tuple[torch.Tensor | None, ...]:
        """``fn(x)`` through the graph captured for ``key`` (captured now if new).

        ``keep_alive``: called at capture; the tensors it returns (weights the graph reads)
        are referenced as long as the graph lives, so their memory is never reused under it.
        """
        why = self.backend.unsupported(x)
        if why is not None:
            self.failures.setdefault(key, why)
            return tuple(fn(x))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                if key in self.failures or key in self.thrashing or self._thrashes(key):
                    self.eager_runs += 1
                    return tuple(fn(x))
                entry = self._capture(key, fn, x, keep_alive)
                if entry is None:
                    self.eager_runs += 1
                    return tuple(fn(x))
            else:
                self._entries.move_to_end(key)
            stream = self.backend.current_stream(x.device)
            if self._last_done is not None:
                stream.wait_event(self._last_done)
            copy_in(entry.static_in, x)
            entry.graph.replay()
            outs = clone_out(entry.static_out) if self.clone_outputs else entry.static_out
            done = self.backend.new_event()
            done.record(stream)
            self._last_done = done
            self.replays += 1
            return outs

    def _thrashes(self, key: Hashable) -> bool:
        """Whether capturing ``key`` now would be one recapture too many (then it is marked)."""
        counts = self._counts.get(key)
        if counts is None or not counts.evicted or counts.recaptures < self.max_recaptures:
            return False
        why = (f"captured {counts.captures} times, its graph evicted {counts.evictions} times "
               f"by other keys (more live shapes than max_graphs={self.max_graphs}): runs "
               "eagerly")
        self.thrashing[key] = why
        if not self._warned_thrash:
            self._warned_thrash = True
            warnings.warn(f"CUDA graph for {key!r} {why} from now on, since each capture "
                          "synchronises the device and empties its cache (slower than eager). "
                          "Raise FastOptions.max_graphs to the number of input shapes in use; "
                          "further such keys are only listed in status()['graphs']['thrashing']",
                          RuntimeWarning, stacklevel=4)
        return True

    def _capture(self, key: Hashable, fn: Callable[[torch.Tensor], Outputs], x: torch.Tensor,
                 keep_alive: Callable[[], tuple] | None) -> _Entry | None:
        device, be = x.device, self.backend
        stream = None
        try:
            stream = self.capture_stream(device)
            if stream is None:
                raise RuntimeError(f"no stream of torch's pool ({streams.POOL_SIZE} per device) "
                                   "is free of other engines' and runners' streams")
            # normal tensors: the static buffers are updated in place by calls made inside and
            # outside inference mode alike
            with normal_tensors():
                static_in = static_input_like(x)
                current = be.current_stream(device)
                stream.wait_stream(current)
                with be.use_stream(stream):
                    for _ in range(self.warmup):
                        fn(static_in)
                current.wait_stream(stream)
                if self._pool is None:
                    self._pool = be.new_pool()
                graph, static_out = be.capture(fn, static_in, pool=self._pool, stream=stream)
        except Exception as e:  # anything: the eager path still works
            why = f"capture failed: {type(e).__name__}: {e}"
            self.failures[key] = why
            warnings.warn(f"CUDA graph for {key!r} not used, running eagerly ({why})",
                          RuntimeWarning, stacklevel=4)
            try:
                be.synchronize(device)
            except Exception:  # the error may be sticky; the eager call will say so
                pass
            self._pool = None  # do not reuse a pool a failed capture may have left in use
            if stream is not None:  # nor a stream it may have left capturing: draw another
                self._streams.pop(device, None)
                streams.release_stream(stream, self)
            return None
        entry = _Entry(graph, static_in, static_out,
                       tuple(keep_alive()) if keep_alive is not None else ())
        self._entries[key] = entry
        counts = self._counts.setdefault(key, _KeyCounts())
        counts.captures += 1
        self.captures += 1
        if counts.evicted:
            counts.evicted = False
            counts.recaptures += 1
            self.recaptures += 1
        while len(self._entries) > self.max_graphs:
            old, _ = self._entries.popitem(last=False)
            old_counts = self._counts[old]
            old_counts.evicted = True
            old_counts.evictions += 1
            self.evictions += 1
        return entry

    def status(self) -> dict:
        return {"graphs": [repr(k) for k in self._entries], "max_graphs": self.max_graphs,
                "captures": self.captures, "recaptures": self.recaptures,
                "evictions": self.evictions, "replays": self.replays,
                "eager_runs": self.eager_runs,
                "failures": {repr(k): v for k, v in self.failures.items()},
                "thrashing": {repr(k): v for k, v in self.thrashing.items()}}
