"""Triton kernel of ``bias_residual`` (``depthpro_fast/ops/bias_residual.py``):
``x + bias + residual (+ residual2)``, and its ReLU too when asked, in one pass (the kernel of
``triton/_conv_epilogue.py``)."""

from __future__ import annotations

import torch

from . import _conv_epilogue

# Allocation hook: tests replace it to poison the outputs (NaN) before the kernel writes them.
_alloc = torch.empty


@torch.library.custom_op("depthpro_fast::bias_residual_triton", mutates_args=())
def _bias_residual_op(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                      residual2: torch.Tensor | None, with_relu: bool) -> list[torch.Tensor]:
    residuals = [residual] + ([residual2] if residual2 is not None else [])
    s, r = _conv_epilogue.launch(x, bias, residuals, True, with_relu, alloc=_alloc)
    return [s, r] if with_relu else [s]


@_bias_residual_op.register_fake
def _(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
      residual2: torch.Tensor | None, with_relu: bool) -> list[torch.Tensor]:
    return [_conv_epilogue.empty_like_map(x) for _ in range(2 if with_relu else 1)]


def bias_residual_triton(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                         residual2: torch.Tensor | None = None, *, with_relu: bool = False,
                         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of :func:`depthpro_fast.ops.bias_residual` (same arguments)."""
    _conv_epilogue.check_dtype("bias_residual", x)
    outs = _bias_residual_op(x, bias, residual, residual2, with_relu)
    return (outs[0], outs[1]) if with_relu else outs[0]
