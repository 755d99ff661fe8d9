"""CUDA streams owned by one engine or graph runner, never shared with another owner.

``torch.cuda.Stream()`` does not create a CUDA stream: it hands out the next one of a pool of
32 streams per priority per device, round-robin (c10/cuda/CUDAStream.cpp, ``kStreamsPerPool``),
so the 33rd ``Stream()`` object of a process wraps the same CUDA stream as the 1st. A runner
that drew a fresh capture stream per capture would, after a few captures, capture on the CUDA
stream that another engine uses as its side stream: with threads, that engine's kernels land
in the graph being captured (or the capture fails).

So each owner draws its stream once per device (``own_stream``) and keeps it, and a stream is
drawn again while its CUDA stream (``stream.cuda_stream``) belongs to another live owner. The
registry holds owners weakly: a collected engine frees its streams. Streams that other code
draws from torch's pool are not seen here (they may still share a CUDA stream with ours;
harmless unless that code captures CUDA graphs on it concurrently).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

#: streams per priority per device in torch's pool (c10 ``kStreamsPerPool``)
POOL_SIZE = 32

_lock = threading.Lock()
_owners: dict[int, weakref.ReferenceType] = {}  # cuda_stream handle -> owner


def stream_handle(stream: Any) -> int:
    """The CUDA stream a ``torch.cuda.Stream`` object wraps (two objects of the pool may wrap
    the same one)."""
    return int(stream.cuda_stream)


def owner_of(stream: Any) -> object | None:
    """The live owner of ``stream``'s CUDA stream, or None."""
    with _lock:
        ref = _owners.get(stream_handle(stream))
        return None if ref is None else ref()


def own_stream(device: torch.device, owner: object,
               factory: Callable[[torch.device], Any] | None = None,
               tries: int = POOL_SIZE) -> Any | None:
    """A stream of ``factory(device)`` (default ``torch.cuda.Stream``) whose CUDA stream no
    other live owner holds, registered to ``owner``; None when ``tries`` draws (a whole pool)
    found only taken streams. The caller keeps it: drawing again per use would cycle torch's
    pool into other owners' streams."""
    make = factory or (lambda d: torch.cuda.Stream(device=d))
    with _lock:
        for _ in range(tries):
            stream = make(device)
            handle = stream_handle(stream)
            ref = _owners.get(handle)
            holder = None if ref is None else ref()
            if holder is None:
                _owners[handle] = weakref.ref(owner)
                return stream
    return None


def release_stream(stream: Any, owner: object) -> None:
    """Give ``stream`` back (if ``owner`` holds it), e.g. after a failed capture."""
    with _lock:
        handle = stream_handle(stream)
        ref = _owners.get(handle)
        if ref is not None and (ref() is None or ref() is owner):
            del _owners[handle]


def owned_count() -> int:
    """CUDA streams held by live owners (for tests and status)."""
    with _lock:
        return sum(1 for ref in _owners.values() if ref() is not None)
