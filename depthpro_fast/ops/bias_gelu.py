"""``gelu(x + bias)`` with the exact (erf) GELU: the epilogue of the ViT MLP's ``fc1``.

``x`` is the raw output of the ``fc1`` GEMM run without its bias. The math is fp32 (GELU of the
fp32 sum), rounded once to the dtype of ``x``. cuBLASLt's fused GELU epilogue uses the tanh
approximation, which is not what DINOv2 / DepthPro were trained with, hence this op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from .layer_norm import check_rows, check_vector


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 math, rounded once to ``x.dtype``."""
    v = x.float()
    if bias is not None:
        v = v + bias.float()
    return F.gelu(v).to(x.dtype)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None, *,
              backend: str | None = None) -> torch.Tensor:
    """Exact GELU of ``x + bias`` (``bias``: optional, per channel of the last axis)."""
    check_rows("bias_gelu", x)
    if bias is not None:
        check_vector("bias_gelu", "bias", bias, x)
    impl = backends.implementation("bias_gelu", backend, x.device)
    return impl(x, bias)


def _load_triton():
    from ..triton.bias_gelu import bias_gelu_triton

    return bias_gelu_triton


backends.register("bias_gelu", "reference", lambda: bias_gelu_reference)
backends.register("bias_gelu", "triton", _load_triton)
