"""Triton kernel of ``quantize_rows`` (see ``depthpro_fast/ops/quantize_fp8.py``): one read of
``BLOCK_M`` whole rows (width <= 16384, in registers), their amax, e4m3 values and fp32 scales."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..device_guard import on_device
from ..fp8_format import E4M3
from ._elementwise import as_rows, row_tiles
from ._fp8 import store_fp8_rows

#: Widest row the kernel accepts (a row lives in registers).
MAX_WIDTH = 16384

# Allocation hook: tests replace it to poison the outputs (NaN) before the kernel writes them.
_alloc = torch.empty


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, N, stride_x, stride_q,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    mask = rmask[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)
    y = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    store_fp8_rows(y, mask, rmask, rows64, cols, q_ptr, s_ptr, stride_q)


def _launch(x: torch.Tensor, q_dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """``q_dtype``: e4m3 (the op); fp32 in the tests (the values before the e4m3 convert)."""
    x2 = as_rows(x)
    m, n = x2.shape
    q = _alloc((m, n), dtype=q_dtype, device=x.device)
    scale = _alloc((m, 1), dtype=torch.float32, device=x.device)
    if m > 0:
        block_m, block_n, warps = row_tiles(m, n)
        with on_device(x):
            _quantize_rows_kernel[(triton.cdiv(m, block_m),)](
                x2, q, scale, m, n, x2.stride(0), q.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=warps)
    return q, scale


@torch.library.custom_op("depthpro_fast::quantize_rows_triton", mutates_args=())
def _quantize_rows_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x)


@_quantize_rows_op.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = x.numel() // x.shape[-1]
    return (x.new_empty((m, x.shape[-1]), dtype=E4M3),
            x.new_empty((m, 1), dtype=torch.float32))


def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of :func:`depthpro_fast.ops.quantize_rows` (same arguments)."""
    if x.shape[-1] > MAX_WIDTH:
        raise ValueError(f"quantize_rows (triton): rows of at most {MAX_WIDTH} elements, got "
                         f"{x.shape[-1]}; use the reference backend")
    return _quantize_rows_op(x)
