"""Triton kernel of ``bias_relu`` (``depthpro_fast/ops/bias_relu.py``): ``relu(x + bias)``, and
``x + bias`` too when asked, in one pass (the kernel of ``triton/_conv_epilogue.py``)."""

from __future__ import annotations

import torch

from . import _conv_epilogue

# Allocation hook: tests replace it to poison the outputs (NaN) before the kernel writes them.
_alloc = torch.empty


@torch.library.custom_op("depthpro_fast::bias_relu_triton", mutates_args=())
def _bias_relu_op(x: torch.Tensor, bias: torch.Tensor | None,
                  keep_sum: bool) -> list[torch.Tensor]:
    s, r = _conv_epilogue.launch(x, bias, [], keep_sum, True, alloc=_alloc)
    return [s, r] if keep_sum else [r]


@_bias_relu_op.register_fake
def _(x: torch.Tensor, bias: torch.Tensor | None, keep_sum: bool) -> list[torch.Tensor]:
    return [_conv_epilogue.empty_like_map(x) for _ in range(2 if keep_sum else 1)]


def bias_relu_triton(x: torch.Tensor, bias: torch.Tensor | None = None, *,
                     keep_sum: bool = False,
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of :func:`depthpro_fast.ops.bias_relu` (same arguments)."""
    _conv_epilogue.check_dtype("bias_relu", x)
    outs = _bias_relu_op(x, bias, keep_sum)
    return (outs[0], outs[1]) if keep_sum else outs[0]
