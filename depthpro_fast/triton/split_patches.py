"""Triton kernel of ``split_patches``: image -> the 35 normalised pyramid windows, in one pass.

Each output element is computed straight from the source image, without materialising the
1536x1536 resized image or the 768 / 384 pyramid levels (spec §2.1-2.2):

- level 0 (25 windows): one pixel R(Y, X) of the bilinearly resized image;
- level 1 (9 windows): the mean of R over the 2x2 block at (2Y, 2X) (= interpolate(x, 0.5));
- level 2 (1 window): the mean of R over the central 2x2 of the 4x4 block at (4y, 4x)
  (= interpolate(x, 0.25), pixels 4y+1 and 4y+2 in each axis);

and R(Y, X) is a bilinear sample of the source with PyTorch's source-index arithmetic
(align_corners=False, no antialias): ``s = (d + 0.5) * (in / out) - 0.5`` rounded once to
float32 (PyTorch's CPU and CUDA kernels evaluate it as one fused multiply-add; here it is exact in
float64 and rounded once, which is the same number), clamped at 0, ``i0 = floor(s)``,
``i1 = min(i0 + 1, in - 1)``, ``lambda = s - i0``. When the input already is 1536x1536 the
resize is the identity and each R is one load.

Normalisation (``2x - 1``, uint8 first divided by 255) is affine, so it is applied once after the
weighted sum. All arithmetic is float32; the result is rounded to ``out_dtype`` once, at the store.

Launch: one program per (BLOCK_Y x BLOCK_X tile of a 384x384 window, window, image); the three
channels share the tile's indices and weights.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ..backends import triton_interpreting
from ..config import IMG_SIZE, WINDOW_SIZE
from ..device_guard import on_device
from ..op_common import PYRAMID, window_origins, windows_per_image

# Pyramid geometry the kernel is written for (checked against op_common at import).
_ORIGINS0 = window_origins(IMG_SIZE, PYRAMID[0][1])
_ORIGINS1 = window_origins(IMG_SIZE // 2, PYRAMID[1][1])
assert IMG_SIZE == 4 * WINDOW_SIZE and windows_per_image() == 35
assert _ORIGINS0 == [i * _ORIGINS0[1] for i in range(len(_ORIGINS0))]
assert _ORIGINS1 == [i * _ORIGINS1[1] for i in range(len(_ORIGINS1))]

#: Output dtypes the kernel writes.
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Image dtypes it reads.
IN_DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16)

# Allocation hook: tests replace it to poison the output (NaN) before the kernel writes it.
_alloc = torch.empty


@triton.jit
def _axis(r, n_in, scale):
    """Resized coordinates ``r`` (int32) -> source (i0, i1) and weights (w0, w1) on one axis."""
    # (r + 0.5) * scale is exact in float64 (24-bit scale times a 12-bit integer + 1/2), so the
    # float32 rounding below happens once, like PyTorch's fused multiply-add.
    s = ((r.to(tl.float64) + 0.5) * scale - 0.5).to(tl.float32)
    s = tl.maximum(s, 0.0)
    i0 = tl.minimum(s.to(tl.int32), n_in - 1)  # s >= 0: truncation is floor
    i1 = tl.minimum(i0 + 1, n_in - 1)
    lam = tl.minimum(tl.maximum(s - i0.to(tl.float32), 0.0), 1.0)
    return i0, i1, 1.0 - lam, lam


@triton.jit
def _level0(src, dst, out_off, out_mask, plane_stride, ry, rx, H, W, s_c, s_h, s_w,
            scale_h, scale_w, norm_mul, norm_add, IDENTITY: tl.constexpr):
    """Level-0 tile: R at rows ``ry`` x columns ``rx``, normalised, all three channels."""
    if IDENTITY:
        off = ry.to(tl.int64)[:, None] * s_h + rx.to(tl.int64)[None, :] * s_w
        for c in tl.static_range(3):
            v = tl.load(src + c * s_c + off).to(tl.float32) * norm_mul + norm_add
            tl.store(dst + c * plane_stride + out_off, v.to(dst.dtype.element_ty),
                     mask=out_mask)
    else:
        y0, y1, wy0, wy1 = _axis(ry, H, scale_h)
        x0, x1, wx0, wx1 = _axis(rx, W, scale_w)
        r0 = y0.to(tl.int64)[:, None] * s_h
        r1 = y1.to(tl.int64)[:, None] * s_h
        c0 = x0.to(tl.int64)[None, :] * s_w
        c1 = x1.to(tl.int64)[None, :] * s_w
        wy0 = wy0[:, None]
        wy1 = wy1[:, None]
        wx0 = wx0[None, :]
        wx1 = wx1[None, :]
        for c in tl.static_range(3):
            p = src + c * s_c
            top = wx0 * tl.load(p + r0 + c0).to(tl.float32) \
                + wx1 * tl.load(p + r0 + c1).to(tl.float32)
            bot = wx0 * tl.load(p + r1 + c0).to(tl.float32) \
                + wx1 * tl.load(p + r1 + c1).to(tl.float32)
            v = (wy0 * top + wy1 * bot) * norm_mul + norm_add
            tl.store(dst + c * plane_stride + out_off, v.to(dst.dtype.element_ty),
                     mask=out_mask)


@triton.jit
def _row4(row, c0, c1, c2, c3, w0, w1, w2, w3):
    """Weighted sum of four column taps of one source row (float32)."""
    return (w0 * tl.load(row + c0).to(tl.float32) + w1 * tl.load(row + c1).to(tl.float32)
            + w2 * tl.load(row + c2).to(tl.float32) + w3 * tl.load(row + c3).to(tl.float32))


@triton.jit
def _pooled(src, dst, out_off, out_mask, plane_stride, ry, rx, H, W, s_c, s_h, s_w,
            scale_h, scale_w, norm_mul, norm_add, IDENTITY: tl.constexpr):
    """Level-1/2 tile: mean of R over rows {ry, ry+1} x columns {rx, rx+1}, all channels."""
    if IDENTITY:
        r0 = ry.to(tl.int64)[:, None] * s_h
        r1 = r0 + s_h
        c0 = rx.to(tl.int64)[None, :] * s_w
        c1 = c0 + s_w
        for c in tl.static_range(3):
            p = src + c * s_c
            v = (tl.load(p + r0 + c0).to(tl.float32) + tl.load(p + r0 + c1).to(tl.float32)
                 + tl.load(p + r1 + c0).to(tl.float32) + tl.load(p + r1 + c1).to(tl.float32))
            v = v * (0.25 * norm_mul) + norm_add
            tl.store(dst + c * plane_stride + out_off, v.to(dst.dtype.element_ty),
                     mask=out_mask)
    else:
        # Two resized rows, each a blend of two source rows: four (row, weight) taps per axis.
        ya0, ya1, wya0, wya1 = _axis(ry, H, scale_h)
        yb0, yb1, wyb0, wyb1 = _axis(ry + 1, H, scale_h)
        xa0, xa1, wxa0, wxa1 = _axis(rx, W, scale_w)
        xb0, xb1, wxb0, wxb1 = _axis(rx + 1, W, scale_w)
        r0 = ya0.to(tl.int64)[:, None] * s_h
        r1 = ya1.to(tl.int64)[:, None] * s_h
        r2 = yb0.to(tl.int64)[:, None] * s_h
        r3 = yb1.to(tl.int64)[:, None] * s_h
        wr0 = wya0[:, None]
        wr1 = wya1[:, None]
        wr2 = wyb0[:, None]
        wr3 = wyb1[:, None]
        c0 = xa0.to(tl.int64)[None, :] * s_w
        c1 = xa1.to(tl.int64)[None, :] * s_w
        c2 = xb0.to(tl.int64)[None, :] * s_w
        c3 = xb1.to(tl.int64)[None, :] * s_w
        wc0 = wxa0[None, :]
        wc1 = wxa1[None, :]
        wc2 = wxb0[None, :]
        wc3 = wxb1[None, :]
        for c in tl.static_range(3):
            p = src + c * s_c
            v = (wr0 * _row4(p + r0, c0, c1, c2, c3, wc0, wc1, wc2, wc3)
                 + wr1 * _row4(p + r1, c0, c1, c2, c3, wc0, wc1, wc2, wc3)
                 + wr2 * _row4(p + r2, c0, c1, c2, c3, wc0, wc1, wc2, wc3)
                 + wr3 * _row4(p + r3, c0, c1, c2, c3, wc0, wc1, wc2, wc3))
            v = v * (0.25 * norm_mul) + norm_add
            tl.store(dst + c * plane_stride + out_off, v.to(dst.dtype.element_ty),
                     mask=out_mask)


@triton.jit
def _split_patches_kernel(
    src, dst, B, H, W, s_b, s_c, s_h, s_w,
    scale_h, scale_w, norm_mul, norm_add,
    IDENTITY: tl.constexpr, WIN: tl.constexpr,
    N0: tl.constexpr, STRIDE0: tl.constexpr, N1: tl.constexpr, STRIDE1: tl.constexpr,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):
    tiles_x: tl.constexpr = (WIN + BLOCK_X - 1) // BLOCK_X
    tile = tl.program_id(0)
    win = tl.program_id(1)
    b = tl.program_id(2)
    y = (tile // tiles_x) * BLOCK_Y + tl.arange(0, BLOCK_Y)  # row inside the window
    x = (tile % tiles_x) * BLOCK_X + tl.arange(0, BLOCK_X)
    # Tiles larger than the window (the interpreter's) clamp their coordinates, so that every
    # load stays in bounds, and mask only the store.
    out_mask = (y < WIN)[:, None] & (x < WIN)[None, :]
    y = tl.minimum(y, WIN - 1)
    x = tl.minimum(x, WIN - 1)
    # (35B, 3, WIN, WIN) contiguous output; window-major, image-minor.
    plane_stride: tl.constexpr = WIN * WIN
    dst_w = dst + (win * B + b).to(tl.int64) * (3 * plane_stride)
    out_off = (y * WIN)[:, None] + x[None, :]
    src_b = src + b.to(tl.int64) * s_b
    n0: tl.constexpr = N0 * N0
    if win < n0:
        # level 0: the resized image itself
        ry = (win // N0) * STRIDE0 + y
        rx = (win % N0) * STRIDE0 + x
        _level0(src_b, dst_w, out_off, out_mask, plane_stride, ry, rx, H, W, s_c, s_h, s_w,
                scale_h, scale_w, norm_mul, norm_add, IDENTITY)
    else:
        if win < n0 + N1 * N1:
            # level 1: mean of R over the 2x2 block at (2Y, 2X) of the 768 level's pixel (Y, X)
            w1 = win - n0
            ry = 2 * ((w1 // N1) * STRIDE1 + y)
            rx = 2 * ((w1 % N1) * STRIDE1 + x)
        else:
            # level 2: mean of R over the central 2x2 (4y+1, 4y+2) of each 4x4 block
            ry = 4 * y + 1
            rx = 4 * x + 1
        _pooled(src_b, dst_w, out_off, out_mask, plane_stride, ry, rx, H, W, s_c, s_h, s_w,
                scale_h, scale_w, norm_mul, norm_add, IDENTITY)


def normalization(image_dtype: torch.dtype, prenormalized: bool) -> tuple[float, float]:
    """(mul, add) so that ``raw * mul + add`` is the normalised value (spec §8: ``2x - 1``)."""
    if image_dtype == torch.uint8:
        return 2.0 / 255.0, -1.0
    if prenormalized:
        return 1.0, 0.0
    return 2.0, -1.0


def resize_scale(size: int) -> float:
    """PyTorch's float32 source/destination scale ``in / out`` of the resize to 1536."""
    return float(np.float32(size) / np.float32(IMG_SIZE))


def _block_shape() -> tuple[int, int, int]:
    # The interpreter pays per program: few big tiles. On a GPU: 16 x 128 tiles, 4 warps.
    if triton_interpreting():
        return 128, 512, 4
    return 16, 128, 4


def launch(image: torch.Tensor, out: torch.Tensor, *, prenormalized: bool) -> torch.Tensor:
    """Write the (35B, 3, 384, 384) windows of ``image`` (B, 3, H, W) into ``out``."""
    b, _, h, w = image.shape
    mul, add = normalization(image.dtype, prenormalized)
    block_y, block_x, warps = _block_shape()
    grid = (triton.cdiv(WINDOW_SIZE, block_y) * triton.cdiv(WINDOW_SIZE, block_x),
            windows_per_image(), b)
    with on_device(image):
        _split_patches_kernel[grid](
            image, out, b, h, w, *image.stride(),
            resize_scale(h), resize_scale(w), mul, add,
            IDENTITY=(h == IMG_SIZE and w == IMG_SIZE), WIN=WINDOW_SIZE,
            N0=len(_ORIGINS0), STRIDE0=_ORIGINS0[1], N1=len(_ORIGINS1), STRIDE1=_ORIGINS1[1],
            BLOCK_Y=block_y, BLOCK_X=block_x, num_warps=warps,
        )
    return out


def _out_shape(image: torch.Tensor) -> tuple[int, int, int, int]:
    return (windows_per_image() * image.shape[0], 3, WINDOW_SIZE, WINDOW_SIZE)


@torch.library.custom_op("depthpro_fast::split_patches_triton", mutates_args=())
def _split_patches_op(image: torch.Tensor, prenormalized: bool,
                      out_dtype: torch.dtype) -> torch.Tensor:
    out = _alloc(_out_shape(image), dtype=out_dtype, device=image.device)
    return launch(image, out, prenormalized=prenormalized)


@_split_patches_op.register_fake
def _(image: torch.Tensor, prenormalized: bool, out_dtype: torch.dtype) -> torch.Tensor:
    return image.new_empty(_out_shape(image), dtype=out_dtype)


def _check(image: torch.Tensor, out_dtype: torch.dtype) -> None:
    if image.dtype not in IN_DTYPES:
        raise TypeError(f"split_patches (triton): image dtype {image.dtype} not accepted; one of "
                        f"{', '.join(str(d) for d in IN_DTYPES)}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"split_patches (triton): out_dtype {out_dtype} not accepted; one of "
                        f"{', '.join(str(d) for d in OUT_DTYPES)}")
    if image.dim() != 4 or image.shape[1] != 3 or image.numel() == 0:
        raise ValueError("split_patches (triton): image must be a non-empty (B, 3, H, W) "
                         f"tensor, got shape {tuple(image.shape)}")
    if image.shape[0] > 65535:
        raise ValueError(f"split_patches (triton): at most 65535 images, got {image.shape[0]}")


def split_patches_triton(image: torch.Tensor, *, prenormalized: bool = False,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Triton implementation of :func:`depthpro_fast.ops.split_patches` (same arguments)."""
    if out_dtype is None:
        out_dtype = image.dtype if image.dtype.is_floating_point else torch.float32
    _check(image, out_dtype)
    return _split_patches_op(image, prenormalized, out_dtype)
