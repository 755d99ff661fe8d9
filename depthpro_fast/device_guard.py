"""Run CUDA work on the device of its tensors, not on the process's current device.

Triton launches a kernel on ``torch.cuda.current_device()`` (and that device's current stream),
whatever device its pointer arguments live on; so do CUDA events recorded without a stream and
``torch.cuda.synchronize()`` without an argument. A model on ``cuda:1`` while the current device
is 0 (a second model in one process, a ``torchrun`` rank that never called ``set_device``) would
then get an illegal address or silently wrong results. ``on_device(t)`` makes ``t``'s device
current for the duration, like PyTorch's own ops (and the CUDA extension's ``CUDAGuard``) do.

Every Triton launch in ``depthpro_fast/triton`` is inside one (``tests/test_device_guard.py``
checks the source and the launches), as are the fast engine's warm-up and forward.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

# One shared no-op context: nullcontext() is reusable and re-entrant.
_NO_SWITCH = contextlib.nullcontext()


def cuda_index(where: Any) -> int | None:
    """The CUDA device index of ``where`` (a tensor, anything with a ``.device``, or a
    ``torch.device``), or None when it is not on an indexed CUDA device."""
    if isinstance(where, torch.Tensor):  # the launch sites' case: two cheap attribute reads
        return where.get_device() if where.is_cuda else None
    device = where if isinstance(where, torch.device) else where.device
    if device.type != "cuda":
        return None
    return device.index


def on_device(where: Any) -> contextlib.AbstractContextManager[Any]:
    """A context in which ``where``'s CUDA device is the current device.

    Cheap where nothing is to be done: a CPU or meta tensor, or a CUDA tensor on the current
    device, gets a shared no-op context (one index comparison); only a tensor on another GPU
    enters ``torch.cuda.device(index)``, which restores the previous device on exit."""
    index = cuda_index(where)
    if index is None or index == torch.cuda.current_device():
        return _NO_SWITCH
    return torch.cuda.device(index)
