"""Triton kernel of ``residual_layerscale`` (see ``depthpro_fast/ops/residual_layerscale.py``):
``x + gamma * (delta + bias)`` in fp32, one rounding at the store."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..device_guard import on_device
from ._elementwise import as_rows, tiles

# Allocation hook: tests replace it to poison the output (NaN) before the kernel writes it.
_alloc = torch.empty


@triton.jit
def _residual_layerscale_kernel(x_ptr, d_ptr, b_ptr, g_ptr, out_ptr, M, N, stride_x, stride_d,
                                stride_out, HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = (rows < M)[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    d = tl.load(d_ptr + rows64[:, None] * stride_d + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if HAS_BIAS:
        d += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_GAMMA:
        d *= tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :],
             (x + d).to(out_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("depthpro_fast::residual_layerscale_triton", mutates_args=())
def _residual_layerscale_op(x: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor | None,
                            gamma: torch.Tensor | None) -> torch.Tensor:
    x2 = as_rows(x)
    d2 = as_rows(delta)
    m, n = x2.shape
    out = _alloc(x.shape, dtype=x.dtype, device=x.device)
    out2 = out.view(m, n)
    if m > 0:
        bias = None if bias is None else bias.contiguous()
        gamma = None if gamma is None else gamma.contiguous()
        block_m, block_n, warps = tiles(m, n)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        with on_device(x):
            _residual_layerscale_kernel[grid](
                x2, d2, bias if bias is not None else x2, gamma if gamma is not None else x2, out2,
                m, n, x2.stride(0), d2.stride(0), out2.stride(0),
                HAS_BIAS=bias is not None, HAS_GAMMA=gamma is not None,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return out


@_residual_layerscale_op.register_fake
def _(x: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor | None,
      gamma: torch.Tensor | None) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def residual_layerscale_triton(x: torch.Tensor, delta: torch.Tensor,
                               bias: torch.Tensor | None = None,
                               gamma: torch.Tensor | None = None) -> torch.Tensor:
    """Triton implementation of :func:`depthpro_fast.ops.residual_layerscale` (same args)."""
    return _residual_layerscale_op(x, delta, bias, gamma)
