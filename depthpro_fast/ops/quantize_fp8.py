"""``quantize_rows(x) -> (q, scale)``: per-row (per-token) e4m3 quantisation for FP8 GEMMs.

``q`` is a (M, K) ``float8_e4m3fn`` tensor (M = every leading axis of ``x`` flattened), ``scale``
a (M, 1) fp32 tensor, and ``q.float() * scale`` approximates ``x`` (the rule is in
``depthpro_fast.fp8_format``). This is the layout ``torch._scaled_mm`` takes as its first
operand with row-wise scales. In the fp8 ViT the quantisation is fused into the pass that makes
the activation (``layer_norm_fp8``, ``bias_gelu_fp8``); this op is the stand-alone pass, for the
attention output (whose row spans every head, so no per-head attention kernel can own it).

``per_tensor=True`` uses one amax for the whole tensor (the scale is still stored per row, all
rows equal): the measurement of what per-token scaling buys; reference implementation only.
"""

from __future__ import annotations

import torch

from .. import backends
from ..fp8_format import E4M3, E4M3_MAX, row_scales
from .layer_norm import check_rows


def scaled_rows_reference(y: torch.Tensor, per_tensor: bool = False,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a 2-D tensor scaled into e4m3's range, before the e4m3 conversion:
    ``(clamp(y * 448 / amax, -448, 448) in fp32, scale = amax / 448 (M, 1) fp32)``."""
    y = y.float()
    # torch's amax propagates NaN: a row with a NaN gets a NaN scale
    amax = y.abs().amax(dim=1, keepdim=True)
    if per_tensor:
        amax = amax.amax().expand_as(amax) if amax.numel() else amax
    scale, inv = row_scales(amax)
    # the clamp keeps NaN (torch.clamp propagates it), so a NaN input stays NaN
    return (y * inv).clamp(-E4M3_MAX, E4M3_MAX), scale.contiguous()


def quantize_scaled_reference(y: torch.Tensor, per_tensor: bool = False,
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise the rows of a 2-D tensor: ``(q e4m3, scale (M, 1) fp32)``, fp32 math."""
    v, scale = scaled_rows_reference(y, per_tensor)
    return v.to(E4M3), scale


def quantize_rows_reference(x: torch.Tensor, per_tensor: bool = False,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure PyTorch: the rows of ``x`` (last axis) quantised in fp32 math."""
    return quantize_scaled_reference(x.reshape(-1, x.shape[-1]), per_tensor)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q.float() * scale`` (fp32): what the FP8 GEMM multiplies."""
    return q.float() * scale.float()


def check_finite_rows(op: str, x: torch.Tensor) -> None:
    """Refuse a tensor with inf / NaN, naming the first bad row (costs a host sync)."""
    bad = ~torch.isfinite(x.reshape(-1, x.shape[-1])).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        raise ValueError(f"{op}: x has non-finite values (inf or NaN) in {rows.numel()} of "
                         f"{bad.numel()} rows, the first at row {int(rows[0])}; FP8 has no "
                         "inf and a scale cannot represent them")


def quantize_rows(x: torch.Tensor, *, per_tensor: bool = False, check_finite: bool = False,
                  backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantisation of ``x`` (fp32 / fp16 / bf16, any leading axes).

    ``check_finite=True`` refuses inf / NaN with a ValueError (a host sync; the forward does not
    check, and there a non-finite row turns into NaNs, see ``fp8_format``).
    """
    check_rows("quantize_rows", x)
    if check_finite:
        check_finite_rows("quantize_rows", x)
    if per_tensor:
        return quantize_rows_reference(x, per_tensor=True)
    impl = backends.implementation("quantize_rows", backend, x.device)
    return impl(x)


def _load_triton():
    from ..triton.quantize_fp8 import quantize_rows_triton

    return quantize_rows_triton


backends.register("quantize_rows", "reference", lambda: quantize_rows_reference)
backends.register("quantize_rows", "triton", _load_triton)
