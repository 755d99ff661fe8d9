"""Triton kernel of ``merge_patches``: windows' tokens -> the stitched (B, C, H, W) map.

The crop (``blend=0``) is a gather: output token (Y, X) of image b is token (Y - s*j, X - s*i)
of window (j, i), the window whose crop covers it (s = window stride in tokens). The blend
(``blend=k``) also reads, on each axis where the output token lies within k/2 of a window
boundary, the neighbouring window, and mixes with linear interpolation
``neighbour + w * (own - neighbour)`` (w = the crop window's weight, in [1/2, 1]; definition in
``depthpro_fast/ops/merge_patches.py``). Neighbours whose weight is 0 are not read, so tokens
away from the ramps are copied exactly and constant windows merge to the constant exactly.

Launch: one program per (block of BLOCK_P output pixels in row-major order; block of BLOCK_C
channels; image). The tile is read along the channels (contiguous in the ViT's (n, T, C) tokens)
and written through the output's strides: along the pixels for NCHW (contiguous across rows too),
along the channels for channels_last; one kernel for both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreting
from ..device_guard import on_device
from ..op_common import merged_size

#: Dtypes of the tokens (the output has the same dtype).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Allocation hook: tests replace it to poison the output (NaN) before the kernel writes it.
_alloc = torch.empty


@triton.jit
def _owner(pos, GRID, PAD, STRIDE, LENGTH, K, BLEND: tl.constexpr):
    """One axis: window ``j`` whose crop covers output token ``pos``, the local token, and for
    the blend the neighbour window ``jn``, its local token and the weight ``w`` of ``j``."""
    j = tl.minimum(tl.maximum(pos - PAD, 0) // STRIDE, GRID - 1)
    local = pos - j * STRIDE
    if BLEND:
        # t = 2 * distance to the boundary - 1 (odd, >= 1); the ramp covers t < K.
        t_lo = 2 * (local - PAD) + 1
        t_hi = 2 * (LENGTH - PAD - local) - 1
        near_lo = (j > 0) & (t_lo < K)
        near_hi = (j < GRID - 1) & (t_hi < K)
        near = near_lo | near_hi
        t = tl.where(near_lo, t_lo, t_hi)
        # (K + t) / 2K, exact integers divided once in float64 (rounded once to float32)
        w = tl.where(near, ((K + t).to(tl.float64) / (2 * K)).to(tl.float32), 1.0)
        jn = tl.where(near_lo, j - 1, tl.where(near_hi, j + 1, j))
        local_n = pos - jn * STRIDE
    else:
        w = 1.0
        jn = j
        local_n = local
    return j, local, jn, local_n, w


@triton.jit
def _merge_patches_kernel(
    src, dst, B, C, H_OUT, W_OUT,
    s_n, s_c, s_y, s_x, src_offset,
    o_b, o_c, o_y, o_x,
    GRID, PAD, STRIDE_Y, STRIDE_X, WIN_H, WIN_W, K,
    BLEND: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # BLOCK_P output pixels of the row-major (H_OUT, W_OUT) plane x BLOCK_C channels.
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2)
    p_ok = p < H_OUT * W_OUT
    p = tl.minimum(p, H_OUT * W_OUT - 1)
    y = p // W_OUT
    x = p % W_OUT
    mask = p_ok[:, None] & (c < C)[None, :]

    jy, ly, jyn, lyn, wy = _owner(y, GRID, PAD, STRIDE_Y, WIN_H, K, BLEND)
    jx, lx, jxn, lxn, wx = _owner(x, GRID, PAD, STRIDE_X, WIN_W, K, BLEND)

    # window (j, i) of image b is entry (j * GRID + i) * B + b
    base = src + src_offset + b.to(tl.int64) * s_n
    chan = c.to(tl.int64)[None, :] * s_c
    row_own = (jy * GRID * B).to(tl.int64) * s_n + ly.to(tl.int64) * s_y
    col_own = (jx * B).to(tl.int64) * s_n + lx.to(tl.int64) * s_x
    v = tl.load(base + (row_own + col_own)[:, None] + chan, mask=mask).to(tl.float32)
    if BLEND:
        row_nb = (jyn * GRID * B).to(tl.int64) * s_n + lyn.to(tl.int64) * s_y
        col_nb = (jxn * B).to(tl.int64) * s_n + lxn.to(tl.int64) * s_x
        mx = mask & (wx < 1.0)[:, None]
        my = mask & (wy < 1.0)[:, None]
        v01 = tl.load(base + (row_own + col_nb)[:, None] + chan, mask=mx, other=0.0)
        v10 = tl.load(base + (row_nb + col_own)[:, None] + chan, mask=my, other=0.0)
        v11 = tl.load(base + (row_nb + col_nb)[:, None] + chan, mask=mx & my, other=0.0)
        v01 = v01.to(tl.float32)
        v10 = v10.to(tl.float32)
        v11 = v11.to(tl.float32)
        wx = wx[:, None]
        top = v01 + wx * (v - v01)
        bottom = v11 + wx * (v10 - v11)
        v = bottom + wy[:, None] * (top - bottom)

    pix = y.to(tl.int64) * o_y + x.to(tl.int64) * o_x
    out = dst + b.to(tl.int64) * o_b + pix[:, None] + c.to(tl.int64)[None, :] * o_c
    tl.store(out, v.to(dst.dtype.element_ty), mask=mask)


def window_layout(tokens: torch.Tensor) -> tuple[int, int, int, tuple[int, int, int, int], int]:
    """(C, h, w, strides (n, c, y, x), element offset of token (0, 0)) of either input form."""
    if tokens.dim() == 3:  # (n, 1 + h*w, C), class token first
        n, t, c = tokens.shape
        side = int(round((t - 1) ** 0.5))
        s_n, s_t, s_c = tokens.stride()
        return c, side, side, (s_n, s_c, side * s_t, s_t), s_t
    n, c, h, w = tokens.shape
    return c, h, w, tokens.stride(), 0


def _blocks(channels: int) -> tuple[int, int, int]:
    # The interpreter pays per program: big tiles. On a GPU: 64 pixels x 64 channels.
    if triton_interpreting():
        return 2048, min(128, triton.next_power_of_2(channels)), 4
    return 64, min(64, triton.next_power_of_2(channels)), 4


def launch(tokens: torch.Tensor, out: torch.Tensor, *, batch_size: int, grid: int, padding: int,
           blend: int) -> torch.Tensor:
    """Write the stitched map of ``tokens`` into ``out`` (B, C, H, W), any memory format."""
    c, h, w, (s_n, s_c, s_y, s_x), offset = window_layout(tokens)
    _, _, h_out, w_out = out.shape
    block_p, block_c, warps = _blocks(c)
    launch_grid = (triton.cdiv(h_out * w_out, block_p), triton.cdiv(c, block_c), batch_size)
    with on_device(tokens):
        _merge_patches_kernel[launch_grid](
            tokens, out, batch_size, c, h_out, w_out,
            s_n, s_c, s_y, s_x, offset, *out.stride(),
            grid, padding, h - 2 * padding, w - 2 * padding, h, w, max(blend, 1),
            BLEND=blend > 1 and grid > 1, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps,
        )
    return out


def _out_shape(tokens: torch.Tensor, batch_size: int, grid: int,
               padding: int) -> tuple[int, int, int, int]:
    c, h, w, _, _ = window_layout(tokens)
    return (batch_size, c, merged_size(h, grid, padding), merged_size(w, grid, padding))


@torch.library.custom_op("depthpro_fast::merge_patches_triton", mutates_args=())
def _merge_patches_op(tokens: torch.Tensor, batch_size: int, grid: int, padding: int,
                      blend: int, channels_last: bool) -> torch.Tensor:
    shape = _out_shape(tokens, batch_size, grid, padding)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = _alloc(shape, dtype=tokens.dtype, device=tokens.device, memory_format=fmt)
    return launch(tokens, out, batch_size=batch_size, grid=grid, padding=padding, blend=blend)


@_merge_patches_op.register_fake
def _(tokens: torch.Tensor, batch_size: int, grid: int, padding: int, blend: int,
      channels_last: bool) -> torch.Tensor:
    shape = _out_shape(tokens, batch_size, grid, padding)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=tokens.dtype, device=tokens.device, memory_format=fmt)


def merge_patches_triton(tokens: torch.Tensor, *, batch_size: int, grid: int, padding: int,
                         blend: int = 0, channels_last: bool = False) -> torch.Tensor:
    """Triton implementation of :func:`depthpro_fast.ops.merge_patches` (same arguments;
    ``depthpro_fast.ops.merge_patches`` validates them)."""
    if tokens.dtype not in DTYPES:
        raise TypeError(f"merge_patches (triton): tokens dtype {tokens.dtype} not accepted; one "
                        f"of {', '.join(str(d) for d in DTYPES)}")
    if batch_size > 65535:
        raise ValueError(f"merge_patches (triton): batch_size at most 65535, got {batch_size}")
    return _merge_patches_op(tokens, batch_size, grid, padding, blend, channels_last)
