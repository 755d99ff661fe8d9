"""LayerNorm that writes its output quantised for an FP8 GEMM (the fp8 ViT's qkv and fc1 inputs).

- ``layer_norm_fp8(x, weight, bias, eps) -> (q, scale)``
- ``add_layer_norm_fp8(x, delta, weight, bias, eps, delta_bias=None, gamma=None)
  -> (r, q, scale)`` with ``r = x + gamma * (delta + delta_bias)`` (rounded to ``x.dtype``, as
  in ``add_layer_norm``) and ``(q, scale)`` the per-row e4m3 quantisation of ``LN(r)``.

``q`` is (M, C) ``float8_e4m3fn``, ``scale`` (M, 1) fp32, M = the rows of ``x`` (leading axes
flattened): ``torch._scaled_mm``'s first operand and its row-wise scale. The LayerNorm is the
same fp32 math as ``layer_norm``; its fp32 output is quantised directly (never rounded to the
model dtype first). ``per_tensor=True`` (one amax for the tensor) runs the reference: it is the
measurement of what per-token scaling buys, not a fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from .layer_norm import (
    check_add_layer_norm,
    check_eps,
    check_rows,
    check_vector,
    residual_update_reference,
)
from .quantize_fp8 import quantize_scaled_reference


def _ln_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             eps: float) -> torch.Tensor:
    n = x.shape[-1]
    return F.layer_norm(x.float().reshape(-1, n), (n,), weight.float(), bias.float(), eps)


def layer_norm_fp8_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float, per_tensor: bool = False,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure PyTorch: fp32 LayerNorm, then per-row (or per-tensor) e4m3 quantisation."""
    return quantize_scaled_reference(_ln_fp32(x, weight, bias, eps), per_tensor)


def add_layer_norm_fp8_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                                 bias: torch.Tensor, eps: float,
                                 delta_bias: torch.Tensor | None = None,
                                 gamma: torch.Tensor | None = None, per_tensor: bool = False,
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unfused chain: residual update (rounded), fp32 LayerNorm of it, quantisation."""
    r = residual_update_reference(x, delta, delta_bias, gamma)
    return (r, *layer_norm_fp8_reference(r, weight, bias, eps, per_tensor))


def layer_norm_fp8(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, *,
                   per_tensor: bool = False, backend: str | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``LN(x)`` over the last axis, quantised per row: ``(q e4m3 (M, C), scale (M, 1))``."""
    op = "layer_norm_fp8"
    check_rows(op, x)
    check_vector(op, "weight", weight, x)
    check_vector(op, "bias", bias, x)
    eps = check_eps(op, eps)
    if per_tensor:
        return layer_norm_fp8_reference(x, weight, bias, eps, per_tensor=True)
    return backends.implementation(op, backend, x.device)(x, weight, bias, eps)


def add_layer_norm_fp8(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float, *, delta_bias: torch.Tensor | None = None,
                       gamma: torch.Tensor | None = None, per_tensor: bool = False,
                       backend: str | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``r = x + gamma * (delta + delta_bias)`` and ``LN(r)`` quantised: ``(r, q, scale)``."""
    op = "add_layer_norm_fp8"
    eps = check_add_layer_norm(op, x, delta, weight, bias, eps, delta_bias, gamma)
    if per_tensor:
        return add_layer_norm_fp8_reference(x, delta, weight, bias, eps, delta_bias, gamma,
                                            per_tensor=True)
    impl = backends.implementation(op, backend, x.device)
    return impl(x, delta, weight, bias, eps, delta_bias, gamma)


def _load_triton(name: str):
    def load():
        from ..triton import layer_norm

        return getattr(layer_norm, name)

    return load


backends.register("layer_norm_fp8", "reference", lambda: layer_norm_fp8_reference)
backends.register("layer_norm_fp8", "triton", _load_triton("layer_norm_fp8_triton"))
backends.register("add_layer_norm_fp8", "reference", lambda: add_layer_norm_fp8_reference)
backends.register("add_layer_norm_fp8", "triton", _load_triton("add_layer_norm_fp8_triton"))
