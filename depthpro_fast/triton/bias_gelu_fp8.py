"""Triton kernel of ``bias_gelu_fp8`` (see ``depthpro_fast/ops/bias_gelu_fp8.py``).

Unlike ``bias_gelu`` (2-D tiles over any column block) a program here owns ``BLOCK_M`` whole rows
(width <= 16384, in registers): the row amax of the GELU output is needed before any value can be
quantised, and recomputing the erf in a second pass would cost more than the registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..device_guard import on_device
from ..fp8_format import E4M3
from ._elementwise import as_rows, row_tiles
from ._fp8 import store_fp8_rows
from .bias_gelu import SQRT1_2

#: Widest row the kernel accepts (a row lives in registers).
MAX_WIDTH = 16384

# Allocation hook: tests replace it to poison the outputs (NaN) before the kernel writes them.
_alloc = torch.empty


@triton.jit
def _bias_gelu_fp8_kernel(x_ptr, b_ptr, q_ptr, s_ptr, M, N, stride_x, stride_q,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    v = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y = 0.5 * v * (1.0 + tl.math.erf(v * SQRT1_2))
    store_fp8_rows(y, mask, rmask, rows64, cols, q_ptr, s_ptr, stride_q)


def _launch(x: torch.Tensor, bias: torch.Tensor | None,
            q_dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """``q_dtype``: e4m3 (the op); fp32 in the tests (the values before the e4m3 convert)."""
    x2 = as_rows(x)
    m, n = x2.shape
    q = _alloc((m, n), dtype=q_dtype, device=x.device)
    scale = _alloc((m, 1), dtype=torch.float32, device=x.device)
    if m > 0:
        bias = None if bias is None else bias.contiguous()
        block_m, block_n, warps = row_tiles(m, n)
        with on_device(x):
            _bias_gelu_fp8_kernel[(triton.cdiv(m, block_m),)](
                x2, bias if bias is not None else x2, q, scale, m, n, x2.stride(0), q.stride(0),
                HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return q, scale


@torch.library.custom_op("depthpro_fast::bias_gelu_fp8_triton", mutates_args=())
def _bias_gelu_fp8_op(x: torch.Tensor,
                      bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, bias)


@_bias_gelu_fp8_op.register_fake
def _(x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    m = x.numel() // x.shape[-1]
    return (x.new_empty((m, x.shape[-1]), dtype=E4M3),
            x.new_empty((m, 1), dtype=torch.float32))


def bias_gelu_fp8_triton(x: torch.Tensor, bias: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of :func:`depthpro_fast.ops.bias_gelu_fp8` (same arguments)."""
    if x.shape[-1] > MAX_WIDTH:
        raise ValueError(f"bias_gelu_fp8 (triton): rows of at most {MAX_WIDTH} elements, got "
                         f"{x.shape[-1]}; use the reference backend")
    return _bias_gelu_fp8_op(x, bias)
