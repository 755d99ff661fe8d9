"""What the CUDA-graph runner (``fast/graphs.py``) needs from the device, and its static buffers.

The runner's policy (which key is captured, kept, evicted, run eagerly, which stream it owns)
does not depend on the device; the primitives it calls (streams, events, capture, replay) are
one object, ``CudaGraphs`` by default, so that a test on a CPU drives the same runner with a
fake of this interface (``tests/graph_fakes.py``).

Inference mode: a tensor made inside ``torch.inference_mode()`` is an inference tensor, and an
inference tensor cannot be updated in place outside inference mode. A graph's static input is
updated in place on every call (``copy_in``), from callers inside or outside inference mode,
so the static buffers (input, and the outputs that capture allocates) are made as normal
tensors (``normal_tensors``), whatever mode the first call came in. A normal tensor can be
updated in place inside inference mode too. The outputs handed back are clones made in the
caller's mode, as an eager forward would make them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

Outputs = Sequence[torch.Tensor | None]


@contextlib.contextmanager
def normal_tensors() -> Iterator[None]:
    """Tensors made inside are normal tensors, also within ``torch.inference_mode()``.

    ``inference_mode(False)`` alone would turn gradients on; the caller's grad mode is kept
    (off for every call the fast engine makes), so nothing records an autograd graph."""
    grad = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        yield


def static_input_like(x: torch.Tensor) -> torch.Tensor:
    """A contiguous normal-tensor copy of ``x``: the buffer a graph reads its input from
    (filled now, so that warm-up runs on real data, never on uninitialised memory)."""
    with normal_tensors():
        buf = torch.empty_like(x, memory_format=torch.contiguous_format)
        buf.copy_(x)
    return buf


def copy_in(static_in: torch.Tensor, x: torch.Tensor) -> None:
    """``x`` into the static input (a normal tensor: in place works in and out of inference
    mode; ``x`` itself may be an inference tensor)."""
    static_in.copy_(x)


def clone_out(static_out: Outputs) -> tuple[torch.Tensor | None, ...]:
    """Clones of the static outputs (made in the caller's mode), so the next replay cannot
    overwrite what this caller holds."""
    return tuple(None if o is None else o.clone() for o in static_out)


class CudaGraphs:
    """The CUDA primitives of the graph runner (``torch.cuda``)."""

    def unsupported(self, x: torch.Tensor) -> str | None:
        """Why ``x`` cannot go through a graph, or None."""
        if x.device.type != "cuda":
            return "not a CUDA tensor: CUDA graphs need a GPU"
        return None

    def new_stream(self, device: torch.device) -> torch.cuda.Stream:
        """A stream of torch's pool (``fast/streams.py`` decides which one is kept)."""
        return torch.cuda.Stream(device=device)

    def current_stream(self, device: torch.device) -> torch.cuda.Stream:
        return torch.cuda.current_stream(device)

    def use_stream(self, stream: torch.cuda.Stream) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)

    def new_event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def new_pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[torch.Tensor], Outputs], static_in: torch.Tensor, *,
                pool: Any, stream: torch.cuda.Stream,
                ) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor | None, ...]]:
        """Capture ``fn(static_in)`` on ``stream`` (the runner's own, never torch's shared
        default capture stream); returns the graph and its static outputs.

        ``capture_error_mode="thread_local"``: other threads may keep using CUDA while this one
        captures (on other streams: the runner owns its capture stream); unsafe calls from
        this thread still fail the capture. ``torch.cuda.graph`` synchronises the device and
        empties the allocator's cache on entry: a capture is expensive."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream,
                              capture_error_mode="thread_local"):
            static_out = tuple(fn(static_in))
        return graph, static_out

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)
