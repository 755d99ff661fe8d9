"""Triton kernel of ``bias_gelu`` (see ``depthpro_fast/ops/bias_gelu.py``): ``gelu(x + bias)``,
exact erf GELU, fp32 math, one rounding at the store."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..device_guard import on_device
from ._elementwise import as_rows, tiles

# Allocation hook: tests replace it to poison the output (NaN) before the kernel writes it.
_alloc = torch.empty

# A @triton.jit body may read a module global only when it is a tl.constexpr: the GPU compiler
# refuses a plain float (the interpreter does not check, hence triton/aot.py).
SQRT1_2: tl.constexpr = tl.constexpr(0.7071067811865476)


@triton.jit
def _bias_gelu_kernel(x_ptr, b_ptr, out_ptr, M, N, stride_x, stride_out,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = (rows < M)[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    v = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y = 0.5 * v * (1.0 + tl.math.erf(v * SQRT1_2))
    tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :],
             y.to(out_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("depthpro_fast::bias_gelu_triton", mutates_args=())
def _bias_gelu_op(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x2 = as_rows(x)
    m, n = x2.shape
    out = _alloc(x.shape, dtype=x.dtype, device=x.device)
    out2 = out.view(m, n)
    if m > 0:
        bias = None if bias is None else bias.contiguous()
        block_m, block_n, warps = tiles(m, n)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        with on_device(x):
            _bias_gelu_kernel[grid](x2, bias if bias is not None else x2, out2, m, n,
                                    x2.stride(0), out2.stride(0), HAS_BIAS=bias is not None,
                                    BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return out


@_bias_gelu_op.register_fake
def _(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def bias_gelu_triton(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton implementation of :func:`depthpro_fast.ops.bias_gelu` (same arguments)."""
    return _bias_gelu_op(x, bias)
