"""Triton kernel of ``layer_norm`` and ``add_layer_norm`` (see ``depthpro_fast/ops/layer_norm.py``).

One program normalises ``BLOCK_M`` whole rows: a row (width <= 16384) is loaded once into
registers, so the statistics are two-pass (mean, then the centred sum of squares) at no extra
memory traffic, all in fp32. With ``HAS_DELTA`` the program first forms the residual update
``x + gamma * (delta + delta_bias)`` in fp32, stores it rounded to the output dtype, and
normalises the rounded values (so ``normed == LN(residual)`` exactly as in the unfused chain).
With ``HAS_SHIFT`` (``layer_norm``'s ``shift``) a per-channel fp32 vector is added to the row
before the statistics (not rounded: the fused ViT's carried biases); the normalised output is
stored in the dtype of its buffer (``out_dtype``: an fp32 residual stream feeding a bf16 GEMM).
With ``QUANT`` (the fp8 ops ``layer_norm_fp8`` / ``add_layer_norm_fp8``) the fp32 normalised rows
are not stored in the model dtype but quantised per row to e4m3 with fp32 scales, in the same
pass (``_fp8.store_fp8_rows``).

Plain pointer arithmetic with masks (no block pointers); 64-bit row offsets.
"""

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
def _layer_norm_kernel(
    x_ptr, d_ptr, db_ptr, g_ptr, sh_ptr, w_ptr, b_ptr, res_ptr, out_ptr, s_ptr,
    M, N, stride_x, stride_d, stride_res, stride_out, eps,
    HAS_DELTA: tl.constexpr, HAS_DBIAS: tl.constexpr, HAS_GAMMA: tl.constexpr,
    HAS_SHIFT: tl.constexpr, QUANT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(d_ptr + rows64[:, None] * stride_d + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        if HAS_DBIAS:
            d += tl.load(db_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_GAMMA:
            d *= tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        r = (x + d).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + rows64[:, None] * stride_res + cols[None, :], r, mask=mask)
        x = r.to(tl.float32)  # normalise what was stored
    if HAS_SHIFT:
        x += tl.load(sh_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    if QUANT:
        # fp8 mode: the fp32 LayerNorm output quantised per row (no rounding in between)
        store_fp8_rows(y, mask, rmask, rows64, cols, out_ptr, s_ptr, stride_out)
    else:
        tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, delta: torch.Tensor | None, delta_bias: torch.Tensor | None,
            gamma: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float,
            q_dtype: torch.dtype | None = None, shift: torch.Tensor | None = None,
            out_dtype: torch.dtype | None = None,
            ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(residual or None, normed, None), or with ``q_dtype`` (the fp8 ops: e4m3; the tests:
    fp32, the values before the e4m3 conversion) (residual or None, q (M, N), scale (M, 1))."""
    x2 = as_rows(x)
    m, n = x2.shape
    weight, bias = weight.contiguous(), bias.contiguous()
    delta_bias = None if delta_bias is None else delta_bias.contiguous()
    gamma = None if gamma is None else gamma.contiguous()
    shift = None if shift is None else shift.contiguous()
    scale = None
    if q_dtype is None:
        out = _alloc(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    else:
        out = _alloc((m, n), dtype=q_dtype, device=x.device)
        scale = _alloc((m, 1), dtype=torch.float32, device=x.device)
    out2 = out.view(m, n)
    res = res2 = None
    d2 = x2  # placeholder pointer when there is no delta (never read)
    if delta is not None:
        d2 = as_rows(delta)
        res = _alloc(x.shape, dtype=x.dtype, device=x.device)
        res2 = res.view(m, n)
    if m > 0:
        block_m, block_n, warps = row_tiles(m, n)
        with on_device(x):
            _layer_norm_kernel[(triton.cdiv(m, block_m),)](
                x2, d2,
                delta_bias if delta_bias is not None else weight,
                gamma if gamma is not None else weight,
                shift if shift is not None else weight,
                weight, bias,
                res2 if res2 is not None else x2, out2,
                scale if scale is not None else weight,
                m, n, x2.stride(0), d2.stride(0),
                (res2 if res2 is not None else x2).stride(0), out2.stride(0), eps,
                HAS_DELTA=delta is not None, HAS_DBIAS=delta_bias is not None,
                HAS_GAMMA=gamma is not None, HAS_SHIFT=shift is not None,
                QUANT=q_dtype is not None, BLOCK_M=block_m,
                BLOCK_N=block_n, num_warps=warps,
            )
    return res, out, scale


@torch.library.custom_op("depthpro_fast::layer_norm_triton", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   shift: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    return _launch(x, None, None, None, weight, bias, eps, shift=shift, out_dtype=out_dtype)[1]


@_layer_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
      shift: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty_like(x, dtype=out_dtype or x.dtype,
                            memory_format=torch.contiguous_format)


@torch.library.custom_op("depthpro_fast::add_layer_norm_triton", mutates_args=())
def _add_layer_norm_op(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float, delta_bias: torch.Tensor | None,
                       gamma: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    res, out, _ = _launch(x, delta, delta_bias, gamma, weight, bias, eps)
    assert res is not None
    return res, out


@_add_layer_norm_op.register_fake
def _(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
      eps: float, delta_bias: torch.Tensor | None,
      gamma: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.custom_op("depthpro_fast::layer_norm_fp8_triton", mutates_args=())
def _layer_norm_fp8_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _, q, scale = _launch(x, None, None, None, weight, bias, eps, E4M3)
    assert scale is not None
    return q, scale


def _fp8_outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = x.numel() // x.shape[-1]
    return (x.new_empty((m, x.shape[-1]), dtype=E4M3),
            x.new_empty((m, 1), dtype=torch.float32))


@_layer_norm_fp8_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _fp8_outputs(x)


@torch.library.custom_op("depthpro_fast::add_layer_norm_fp8_triton", mutates_args=())
def _add_layer_norm_fp8_op(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor, eps: float, delta_bias: torch.Tensor | None,
                           gamma: torch.Tensor | None,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    res, q, scale = _launch(x, delta, delta_bias, gamma, weight, bias, eps, E4M3)
    assert res is not None and scale is not None
    return res, q, scale


@_add_layer_norm_fp8_op.register_fake
def _(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
      eps: float, delta_bias: torch.Tensor | None,
      gamma: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.empty_like(x, memory_format=torch.contiguous_format), *_fp8_outputs(x))


def _check_width(op: str, x: torch.Tensor) -> None:
    if x.shape[-1] > MAX_WIDTH:
        raise ValueError(f"{op} (triton): rows of at most {MAX_WIDTH} elements, got "
                         f"{x.shape[-1]}; use the reference backend")


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      eps: float, shift: torch.Tensor | None = None,
                      out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Triton implementation of :func:`depthpro_fast.ops.layer_norm` (same arguments)."""
    _check_width("layer_norm", x)
    return _layer_norm_op(x, weight, bias, eps, shift, out_dtype)


def add_layer_norm_triton(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor, eps: float, delta_bias: torch.Tensor | None = None,
                          gamma: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of :func:`depthpro_fast.ops.add_layer_norm` (same arguments)."""
    _check_width("add_layer_norm", x)
    return _add_layer_norm_op(x, delta, weight, bias, eps, delta_bias, gamma)


def layer_norm_fp8_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of :func:`depthpro_fast.ops.layer_norm_fp8` (same arguments)."""
    _check_width("layer_norm_fp8", x)
    return _layer_norm_fp8_op(x, weight, bias, eps)


def add_layer_norm_fp8_triton(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor, eps: float,
                              delta_bias: torch.Tensor | None = None,
                              gamma: torch.Tensor | None = None,
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton implementation of :func:`depthpro_fast.ops.add_layer_norm_fp8` (same
    arguments)."""
    _check_width("add_layer_norm_fp8", x)
    return _add_layer_norm_fp8_op(x, delta, weight, bias, eps, delta_bias, gamma)
