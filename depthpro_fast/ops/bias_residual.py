"""``x + bias + residual (+ residual2)`` on a conv output, optionally writing its ReLU too: the
end of a decoder residual block (``x + conv(relu(conv(relu(x))))``) with the second conv run
without its bias, and, in a feature-fusion block, the add of the incoming features as well.
One pass instead of a bias pass and one or two residual adds (and the ReLU copy the next
residual block starts with, ``with_relu=True``).

All maps (N, C, H, W) of one shape and dtype, channels_last or contiguous (the residuals are
brought to ``x``'s format when they differ); ``bias``: (C,) or None. Math in fp32, in the order
``((x + bias) + residual) + residual2``, each output rounded once.
"""

from __future__ import annotations

import torch

from .. import backends
from ..op_common import check_channel_vector, check_feature_map, feature_map_format, math_dtype


def bias_residual_reference(x: torch.Tensor, bias: torch.Tensor | None,
                            residual: torch.Tensor, residual2: torch.Tensor | None = None, *,
                            with_relu: bool = False,
                            ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 math (fp64 for fp64): ``s = x + bias + residual (+ residual2)``; returns ``s`` or
    ``(s, relu(s))``."""
    s = x.to(math_dtype(x.dtype))
    if bias is not None:
        s = s + bias.to(s.dtype).view(1, -1, 1, 1)
    s = s + residual.to(s.dtype)
    if residual2 is not None:
        s = s + residual2.to(s.dtype)
    fmt = feature_map_format(x)
    out = s.to(x.dtype).contiguous(memory_format=fmt)
    if with_relu:
        return out, s.relu().to(x.dtype).contiguous(memory_format=fmt)
    return out


def bias_residual(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                  residual2: torch.Tensor | None = None, *, with_relu: bool = False,
                  backend: str | None = None,
                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``x + bias + residual (+ residual2)``; ``with_relu=True`` also returns its ReLU."""
    check_feature_map("bias_residual", "x", x)
    if bias is not None:
        check_channel_vector("bias_residual", "bias", bias, x.shape[1], x)
    check_feature_map("bias_residual", "residual", residual, like=x)
    if residual2 is not None:
        check_feature_map("bias_residual", "residual2", residual2, like=x)
    impl = backends.implementation("bias_residual", backend, x.device)
    return impl(x, bias, residual, residual2, with_relu=with_relu)


def _load_triton():
    from ..triton.bias_residual import bias_residual_triton

    return bias_residual_triton


backends.register("bias_residual", "reference", lambda: bias_residual_reference)
backends.register("bias_residual", "triton", _load_triton)
