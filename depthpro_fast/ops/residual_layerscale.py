"""The end of a ViT branch: ``x + gamma * (delta + bias)`` (GEMM bias, LayerScale, residual).

``delta`` is the raw output of the ``proj`` or ``fc2`` GEMM run without its bias; the bias add,
the LayerScale multiply and the residual add happen in one pass over the tensors. The update is
computed in fp32 and rounded once to the dtype of ``x``. When a LayerNorm follows (always, inside
the ViT) ``add_layer_norm`` in ``layer_norm.py`` fuses it too; this op is the same epilogue for
places without one, and the unfused step of the ``fuse_layer_norm=False`` variant of the fast
path (kept to measure what the LayerNorm fusion buys).
"""

from __future__ import annotations

import torch

from .. import backends
from .layer_norm import check_delta, check_rows, check_vector, residual_update_reference


def residual_layerscale_reference(x: torch.Tensor, delta: torch.Tensor,
                                  bias: torch.Tensor | None = None,
                                  gamma: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 math, rounded once to ``x.dtype``."""
    return residual_update_reference(x, delta, bias, gamma)


def residual_layerscale(x: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor | None = None,
                        gamma: torch.Tensor | None = None, *,
                        backend: str | None = None) -> torch.Tensor:
    """``x + gamma * (delta + bias)``; ``bias`` and ``gamma`` are optional per-channel vectors
    over the last axis; ``x`` and ``delta`` have one shape and dtype."""
    op = "residual_layerscale"
    check_rows(op, x)
    check_delta(op, delta, x)
    if bias is not None:
        check_vector(op, "bias", bias, x)
    if gamma is not None:
        check_vector(op, "gamma", gamma, x)
    impl = backends.implementation(op, backend, x.device)
    return impl(x, delta, bias, gamma)


def _load_triton():
    from ..triton.residual_layerscale import residual_layerscale_triton

    return residual_layerscale_triton


backends.register("residual_layerscale", "reference", lambda: residual_layerscale_reference)
backends.register("residual_layerscale", "triton", _load_triton)
