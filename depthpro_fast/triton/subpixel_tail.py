"""Triton kernel of ``subpixel_tail`` (``depthpro_fast/ops/subpixel_tail.py``): the sub-pixel
head's bias (+ border corrections), ReLU, per-phase 1x1 conv to one channel, ReLU and depth-to-
space in one pass.

One program per BLOCK_PIX low-resolution pixels (flattened over N, H, W); it loads their
(4 phases x P) channels as one 3-D tile (any strides: channels_last or contiguous ``z``), so the
phase's dot product over P is a reduction along the tile's last axis, and stores the 4 output
pixels of each (the 2x2 block ``(2i + a, 2j + b)``). fp32 math, one rounding at the store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreting
from ..device_guard import on_device

# Allocation hook: tests replace it to poison the output (NaN) before the kernel writes it.
_alloc = torch.empty


@triton.jit
def _subpixel_tail_kernel(z_ptr, w_ptr, ob_ptr, b_ptr, border_ptr, out_ptr,
                          NPIX, H, W, P, stride_n, stride_c, stride_h, stride_w,
                          HAS_BIAS: tl.constexpr, HAS_BORDER: tl.constexpr,
                          BLOCK_PIX: tl.constexpr, BLOCK_P: tl.constexpr):
    pix = tl.program_id(0) * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
    pmask = pix < NPIX
    j = pix % W
    i = (pix // W) % H
    n = (pix // (W * H)).to(tl.int64)
    g = tl.arange(0, 4)
    p = tl.arange(0, BLOCK_P)
    ch = g[:, None] * P + p[None, :]  # (4, BLOCK_P): phase-major channel index
    cmask = (p < P)[None, :] & (g < 4)[:, None]
    mask = pmask[:, None, None] & cmask[None, :, :]
    base = n * stride_n + i.to(tl.int64) * stride_h + j.to(tl.int64) * stride_w
    v = tl.load(z_ptr + base[:, None, None] + ch[None, :, :] * stride_c, mask=mask,
                other=0.0).to(tl.float32)
    C = 4 * P
    if HAS_BIAS:
        v += tl.load(b_ptr + ch, mask=cmask, other=0.0).to(tl.float32)[None, :, :]
    if HAS_BORDER:
        top = (i == 0).to(tl.float32)[:, None, None]
        bottom = (i == H - 1).to(tl.float32)[:, None, None]
        left = (j == 0).to(tl.float32)[:, None, None]
        right = (j == W - 1).to(tl.float32)[:, None, None]
        v -= top * tl.load(border_ptr + 0 * C + ch, mask=cmask, other=0.0)[None, :, :]
        v -= bottom * tl.load(border_ptr + 1 * C + ch, mask=cmask, other=0.0)[None, :, :]
        v -= left * tl.load(border_ptr + 2 * C + ch, mask=cmask, other=0.0)[None, :, :]
        v -= right * tl.load(border_ptr + 3 * C + ch, mask=cmask, other=0.0)[None, :, :]
        v += top * left * tl.load(border_ptr + 4 * C + ch, mask=cmask, other=0.0)[None, :, :]
        v += top * right * tl.load(border_ptr + 5 * C + ch, mask=cmask, other=0.0)[None, :, :]
        v += bottom * left * tl.load(border_ptr + 6 * C + ch, mask=cmask,
                                     other=0.0)[None, :, :]
        v += bottom * right * tl.load(border_ptr + 7 * C + ch, mask=cmask,
                                      other=0.0)[None, :, :]
    a = tl.maximum(v, 0.0)
    wv = tl.load(w_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    s = tl.sum(a * wv[None, :, :], axis=2)  # (BLOCK_PIX, 4)
    s += tl.load(ob_ptr + g).to(tl.float32)[None, :]
    y = tl.maximum(s, 0.0)
    # depth-to-space: phase g = 2 a + b of pixel (i, j) -> output pixel (2 i + a, 2 j + b)
    orow = 2 * i[:, None] + (g // 2)[None, :]
    ocol = 2 * j[:, None] + (g % 2)[None, :]
    off = n[:, None] * (4 * H * W) + orow.to(tl.int64) * (2 * W) + ocol
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=pmask[:, None])


def _blocks(npix: int, p: int) -> tuple[int, int, int]:
    block_p = triton.next_power_of_2(p)
    if triton_interpreting():  # the interpreter pays per program: large tiles
        return min(triton.next_power_of_2(npix), max(1, (1 << 16) // block_p)), block_p, 4
    # 4 x 32 channels x 32 pixels = 4096 elements (16 per thread at 8 warps)
    return max(1, min(4096 // (4 * block_p), triton.next_power_of_2(npix))), block_p, 4


@torch.library.custom_op("depthpro_fast::subpixel_tail_triton", mutates_args=())
def _subpixel_tail_op(z: torch.Tensor, weight: torch.Tensor, out_bias: torch.Tensor,
                      bias: torch.Tensor | None, border: torch.Tensor | None) -> torch.Tensor:
    n, c, h, w = z.shape
    out = _alloc((n, 1, 2 * h, 2 * w), dtype=z.dtype, device=z.device)
    npix = n * h * w
    if npix:
        p = c // 4
        block_pix, block_p, warps = _blocks(npix, p)
        dummy = weight
        with on_device(z):
            _subpixel_tail_kernel[(triton.cdiv(npix, block_pix),)](
                z, weight.contiguous(), out_bias.contiguous(),
                bias.contiguous() if bias is not None else dummy,
                border.float().contiguous() if border is not None else dummy, out,
                npix, h, w, p, *z.stride(), HAS_BIAS=bias is not None,
                HAS_BORDER=border is not None, BLOCK_PIX=block_pix, BLOCK_P=block_p,
                num_warps=warps)
    return out


@_subpixel_tail_op.register_fake
def _(z: torch.Tensor, weight: torch.Tensor, out_bias: torch.Tensor,
      bias: torch.Tensor | None, border: torch.Tensor | None) -> torch.Tensor:
    n, _, h, w = z.shape
    return z.new_empty((n, 1, 2 * h, 2 * w))


def subpixel_tail_triton(z: torch.Tensor, weight: torch.Tensor, out_bias: torch.Tensor,
                         bias: torch.Tensor | None = None,
                         border: torch.Tensor | None = None) -> torch.Tensor:
    """Triton implementation of :func:`depthpro_fast.ops.subpixel_tail` (same arguments)."""
    if z.dtype == torch.float64:
        raise TypeError("subpixel_tail (triton): float64 is not supported (fp32 arithmetic); "
                        "use backend='reference' for float64")
    return _subpixel_tail_op(z, weight, out_bias, bias, border)
