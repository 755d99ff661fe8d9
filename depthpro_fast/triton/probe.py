"""The launch probe: one tiny Triton kernel, launched once per process and device before the
Triton backend is trusted (``backends.triton_launch_probe``).

A first launch builds Triton's C launcher (a C compiler and Python's headers are needed) and
compiles a kernel for the device; this one does both, on 16 floats, and checks the result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..device_guard import on_device

_N = 16


@triton.jit
def _probe_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)


def launch_probe_kernel(x: torch.Tensor) -> None:
    """The probe's launch alone, on ``x`` (16 float32): also what the sm_90 AOT check
    compiles (``triton/aot.py``)."""
    with on_device(x):
        _probe_kernel[(1,)](x, _N, BLOCK=_N)


def launch_probe(device: torch.device) -> None:
    """Launch the probe kernel on ``device``; raise if the launch fails or computes wrong."""
    x = torch.arange(_N, dtype=torch.float32, device=device)
    launch_probe_kernel(x)
    got = x.cpu()  # waits for the kernel
    want = torch.arange(_N, dtype=torch.float32) + 1
    if not torch.equal(got, want):
        raise RuntimeError(f"the probe kernel ran but wrote {got.tolist()[:4]}..., expected "
                           f"{want.tolist()[:4]}...")
