"""``bias_gelu_fp8(x, bias) -> (q, scale)``: the fp8 ViT's fc1 epilogue, quantised for fc2.

``gelu(x + bias)`` (exact erf GELU, fp32 math, as ``bias_gelu``) quantised per row to e4m3 in
the same pass: ``q`` (M, N) ``float8_e4m3fn`` and ``scale`` (M, 1) fp32, M = the rows of ``x``
(leading axes flattened): the fc2 GEMM's first operand and its row-wise scale. The fp32 GELU
output is quantised directly (never rounded to the model dtype first). ``per_tensor=True`` runs
the reference (the measurement of what per-token scaling buys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from .layer_norm import check_rows, check_vector
from .quantize_fp8 import quantize_scaled_reference


def bias_gelu_fp8_reference(x: torch.Tensor, bias: torch.Tensor | None = None,
                            per_tensor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure PyTorch: fp32 GELU of ``x + bias``, then per-row (or per-tensor) quantisation."""
    v = x.float().reshape(-1, x.shape[-1])
    if bias is not None:
        v = v + bias.float()
    return quantize_scaled_reference(F.gelu(v), per_tensor)


def bias_gelu_fp8(x: torch.Tensor, bias: torch.Tensor | None = None, *,
                  per_tensor: bool = False, backend: str | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact GELU of ``x + bias``, quantised per row: ``(q e4m3 (M, N), scale (M, 1))``."""
    check_rows("bias_gelu_fp8", x)
    if bias is not None:
        check_vector("bias_gelu_fp8", "bias", bias, x)
    if per_tensor:
        return bias_gelu_fp8_reference(x, bias, per_tensor=True)
    return backends.implementation("bias_gelu_fp8", backend, x.device)(x, bias)


def _load_triton():
    from ..triton.bias_gelu_fp8 import bias_gelu_fp8_triton

    return bias_gelu_fp8_triton


backends.register("bias_gelu_fp8", "reference", lambda: bias_gelu_fp8_reference)
backends.register("bias_gelu_fp8", "triton", _load_triton)
