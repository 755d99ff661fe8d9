"""Tile choices shared by the row-wise elementwise epilogue kernels: ``tiles`` for the kernels
that work on any column block (bias_gelu, residual_layerscale: 2-D tiles over (rows, channels) so
that a per-channel vector is loaded once per tile, with unit column stride for wide (16-byte)
accesses), ``row_tiles`` for those that need whole rows in registers (LayerNorm statistics, the
fp8 kernels' row amax)."""

from __future__ import annotations

import torch
import triton

from ..backends import triton_interpreting


def tiles(m: int, n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for an (m, n) row-major tensor."""
    if triton_interpreting():
        # The interpreter pays per program: a few large tiles.
        block_n = triton.next_power_of_2(n)
        block_m = min(max(1, (1 << 17) // block_n), triton.next_power_of_2(m))
        return block_m, block_n, 4
    block_n = min(triton.next_power_of_2(n), 256)
    block_m = max(1, min(8192 // block_n, triton.next_power_of_2(m)))
    return block_m, block_n, 8 if block_m * block_n >= 4096 else 4


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D (rows, width) view with unit column stride (a copy only when needed)."""
    t2 = t.reshape(-1, t.shape[-1])
    if t2.shape[1] > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def row_tiles(m: int, n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) with BLOCK_N covering the whole row."""
    block_n = triton.next_power_of_2(n)
    if triton_interpreting():
        # The interpreter pays per program: a few large tiles.
        block_m = min(max(1, (1 << 17) // block_n), triton.next_power_of_2(m))
        return block_m, block_n, 4
    # GPU: ~4096 elements per program (16 fp32 values per thread at 8 warps).
    block_m = max(1, min(4096 // block_n, triton.next_power_of_2(m)))
    warps = 8 if block_n * block_m >= 4096 else 4
    return block_m, block_n, warps
