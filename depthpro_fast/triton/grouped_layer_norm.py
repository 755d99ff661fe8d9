"""Triton kernel of ``grouped_layer_norm`` and ``grouped_add_layer_norm`` (see
``depthpro_fast/ops/grouped_layer_norm.py``): the LayerNorm passes of the lock-stepped ViTs.

As ``_layer_norm_kernel`` (``triton/layer_norm.py``: whole rows in registers, fp32 two-pass
statistics, the residual rounded before it is normalised), plus: each row finds its ViT ``g``
from the ``GROUPS - 1`` row boundaries (scalar loads, compared with the row index: no sync, the
same kernel for any batch) and reads its parameters from row ``g`` of the stacked ``(G, C)``
vectors; with ``PAD > 0`` it also writes the GEMM bias lanes after the ``C`` normalised values
(1 at column ``C``, 0 after). Plain pointer arithmetic with masks; 64-bit row offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..device_guard import on_device
from ._elementwise import row_tiles

#: Widest row the kernel accepts (a row lives in registers).
MAX_WIDTH = 16384

# Allocation hook: tests replace it to poison the outputs (NaN) before the kernel writes them.
_alloc = torch.empty


@triton.jit
def _grouped_layer_norm_kernel(
    x_ptr, d_ptr, db_ptr, g_ptr, w_ptr, b_ptr, ends_ptr, res_ptr, out_ptr,
    M, N, stride_x, stride_d, stride_res, stride_out, eps,
    GROUPS: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_DBIAS: tl.constexpr,
    HAS_GAMMA: tl.constexpr, PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_PAD: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    # the row's ViT: how many boundaries lie at or before it
    grp = tl.zeros([BLOCK_M], dtype=tl.int64)
    for j in tl.static_range(GROUPS - 1):
        grp += (rows64 >= tl.load(ends_ptr + j).to(tl.int64)).to(tl.int64)
    par = grp[:, None] * N + cols[None, :]  # offsets into the stacked (G, N) parameters
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(d_ptr + rows64[:, None] * stride_d + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        if HAS_DBIAS:
            d += tl.load(db_ptr + par, mask=mask, other=0.0).to(tl.float32)
        if HAS_GAMMA:
            d *= tl.load(g_ptr + par, mask=mask, other=0.0).to(tl.float32)
        r = (x + d).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + rows64[:, None] * stride_res + cols[None, :], r, mask=mask)
        x = r.to(tl.float32)  # normalise what was stored
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + par, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + par, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w + b
    tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :],
             y.to(out_ptr.dtype.element_ty), mask=mask)
    if PAD > 0:
        pc = tl.arange(0, BLOCK_PAD)
        lane = tl.where(pc == 0, 1.0, 0.0)
        lanes = tl.zeros([BLOCK_M, BLOCK_PAD], dtype=tl.float32) + lane[None, :]
        pmask = rmask[:, None] & (pc < PAD)[None, :]
        tl.store(out_ptr + rows64[:, None] * stride_out + N + pc[None, :],
                 lanes.to(out_ptr.dtype.element_ty), mask=pmask)


def _launch(x: torch.Tensor, delta: torch.Tensor | None, delta_bias: torch.Tensor | None,
            gamma: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float,
            group_ends: torch.Tensor, out_width: int | None,
            ) -> tuple[torch.Tensor | None, torch.Tensor]:
    m, n = x.shape
    width = n if out_width is None else out_width
    x2 = x if x.stride(1) == 1 else x.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()
    delta_bias = None if delta_bias is None else delta_bias.contiguous()
    gamma = None if gamma is None else gamma.contiguous()
    out = _alloc((m, width), dtype=x.dtype, device=x.device)
    res = None
    d2 = x2  # placeholder pointer when there is no delta (never read)
    if delta is not None:
        d2 = delta if delta.stride(1) == 1 else delta.contiguous()
        res = _alloc((m, n), dtype=x.dtype, device=x.device)
    if m > 0:
        block_m, block_n, warps = row_tiles(m, n)
        pad = width - n
        with on_device(x):
            _grouped_layer_norm_kernel[(triton.cdiv(m, block_m),)](
                x2, d2,
                delta_bias if delta_bias is not None else weight,
                gamma if gamma is not None else weight,
                weight, bias, group_ends,
                res if res is not None else x2, out,
                m, n, x2.stride(0), d2.stride(0),
                (res if res is not None else x2).stride(0), out.stride(0), eps,
                GROUPS=weight.shape[0], HAS_DELTA=delta is not None,
                HAS_DBIAS=delta_bias is not None, HAS_GAMMA=gamma is not None, PAD=pad,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_PAD=triton.next_power_of_2(max(pad, 1)),
                num_warps=warps,
            )
    return res, out


def _out_like(x: torch.Tensor, out_width: int | None) -> torch.Tensor:
    return x.new_empty((x.shape[0], x.shape[1] if out_width is None else out_width))


@torch.library.custom_op("depthpro_fast::grouped_layer_norm_triton", mutates_args=())
def _grouped_layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float, group_ends: torch.Tensor,
                           out_width: int | None) -> torch.Tensor:
    return _launch(x, None, None, None, weight, bias, eps, group_ends, out_width)[1]


@_grouped_layer_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
      group_ends: torch.Tensor, out_width: int | None) -> torch.Tensor:
    return _out_like(x, out_width)


@torch.library.custom_op("depthpro_fast::grouped_add_layer_norm_triton", mutates_args=())
def _grouped_add_layer_norm_op(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor, eps: float, group_ends: torch.Tensor,
                               delta_bias: torch.Tensor | None, gamma: torch.Tensor | None,
                               out_width: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    res, out = _launch(x, delta, delta_bias, gamma, weight, bias, eps, group_ends, out_width)
    assert res is not None
    return res, out


@_grouped_add_layer_norm_op.register_fake
def _(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
      eps: float, group_ends: torch.Tensor, delta_bias: torch.Tensor | None,
      gamma: torch.Tensor | None, out_width: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), _out_like(x, out_width)


def _check_width(op: str, x: torch.Tensor) -> None:
    if x.shape[-1] > MAX_WIDTH:
        raise ValueError(f"{op} (triton): rows of at most {MAX_WIDTH} elements, got "
                         f"{x.shape[-1]}; use the reference backend")


def grouped_layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              eps: float, group_ends: torch.Tensor,
                              out_width: int | None = None) -> torch.Tensor:
    """Triton implementation of :func:`depthpro_fast.ops.grouped_layer_norm`."""
    _check_width("grouped_layer_norm", x)
    return _grouped_layer_norm_op(x, weight, bias, eps, group_ends, out_width)


def grouped_add_layer_norm_triton(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor, eps: float, group_ends: torch.Tensor,
                                  delta_bias: torch.Tensor | None = None,
                                  gamma: torch.Tensor | None = None,
                                  out_width: int | None = None,
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of :func:`depthpro_fast.ops.grouped_add_layer_norm`."""
    _check_width("grouped_add_layer_norm", x)
    return _grouped_add_layer_norm_op(x, delta, weight, bias, eps, group_ends, delta_bias,
                                      gamma, out_width)
