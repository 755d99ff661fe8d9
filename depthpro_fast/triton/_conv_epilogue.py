"""The one elementwise kernel behind the decoder's conv epilogues (``bias_relu``,
``bias_residual``): ``s = x + bias[c] (+ r) (+ r2)`` in fp32, then ``s`` and / or ``relu(s)``
stored, each rounded once.

A dense (N, C, H, W) map is seen as a 2-D (rows, cols) array with unit column stride:
channels_last memory is (N*H*W, C) with the channel on the columns, contiguous memory is
(N*C, H*W) with the channel ``row % C`` on the rows (``BIAS_ON_ROWS``). Every input and output
of one launch has the same format, so one offset serves them all.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..device_guard import on_device
from ..op_common import feature_map_format
from ._elementwise import tiles


@triton.jit
def _conv_epilogue_kernel(x_ptr, b_ptr, r_ptr, r2_ptr, sum_ptr, relu_ptr, M, N, C,
                          HAS_BIAS: tl.constexpr, BIAS_ON_ROWS: tl.constexpr,
                          N_RES: tl.constexpr, WRITE_SUM: tl.constexpr,
                          WRITE_RELU: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]  # int64: 35 x 256 x 768^2 elements
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        if BIAS_ON_ROWS:
            v += tl.load(b_ptr + rows % C, mask=rmask, other=0.0).to(tl.float32)[:, None]
        else:
            v += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if N_RES >= 1:
        v += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if N_RES >= 2:
        v += tl.load(r2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if WRITE_SUM:
        tl.store(sum_ptr + offs, v.to(sum_ptr.dtype.element_ty), mask=mask)
    if WRITE_RELU:
        tl.store(relu_ptr + offs, tl.maximum(v, 0.0).to(relu_ptr.dtype.element_ty), mask=mask)


def empty_like_map(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised map of ``x``'s shape, dtype and (dense) format: the fake outputs."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device,
                       memory_format=feature_map_format(x))


def launch(x: torch.Tensor, bias: torch.Tensor | None, residuals: list[torch.Tensor],
           write_sum: bool, write_relu: bool,
           alloc=torch.empty) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Run the kernel on (N, C, H, W) ``x``; returns (sum or None, relu or None) in ``x``'s
    format (inputs of another layout, or strided, are made dense in it first)."""
    fmt = feature_map_format(x)
    x = x.contiguous(memory_format=fmt)
    residuals = [r.contiguous(memory_format=fmt) for r in residuals]
    n, c, h, w = x.shape
    outs = [alloc(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
            if want else None for want in (write_sum, write_relu)]
    channels_last = fmt == torch.channels_last and c > 1
    m, cols = (n * h * w, c) if channels_last else (n * c, h * w)
    if x.numel():
        block_m, block_n, warps = tiles(m, cols)
        grid = (triton.cdiv(m, block_m), triton.cdiv(cols, block_n))
        dummy = x
        r = residuals + [dummy] * (2 - len(residuals))
        with on_device(x):
            _conv_epilogue_kernel[grid](
                x, bias.contiguous() if bias is not None else dummy, r[0], r[1],
                outs[0] if outs[0] is not None else dummy,
                outs[1] if outs[1] is not None else dummy,
                m, cols, c, HAS_BIAS=bias is not None, BIAS_ON_ROWS=not channels_last,
                N_RES=len(residuals), WRITE_SUM=write_sum, WRITE_RELU=write_relu,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return outs[0], outs[1]


def check_dtype(op: str, x: torch.Tensor) -> None:
    """The kernels compute in fp32: float64 stays on the reference backend."""
    if x.dtype == torch.float64:
        raise TypeError(f"{op} (triton): float64 is not supported (fp32 arithmetic); use "
                        "backend='reference' for float64")
