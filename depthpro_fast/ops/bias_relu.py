"""``relu(x + bias)`` on a conv output, optionally writing ``x + bias`` too: the epilogue of a
decoder conv run without its bias (PyTorch's cuDNN path adds a conv bias in a pass of its own,
and ``F.relu`` of a tensor that is still needed makes a copy; here one pass does both).

``x``: (N, C, H, W), channels_last or contiguous; ``bias``: (C,) or None. Math in fp32, each
output rounded once to ``x``'s dtype; outputs in ``x``'s memory format.
"""

from __future__ import annotations

import torch

from .. import backends
from ..op_common import check_channel_vector, check_feature_map, feature_map_format, math_dtype


def bias_relu_reference(x: torch.Tensor, bias: torch.Tensor | None = None, *,
                        keep_sum: bool = False,
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 math (fp64 for fp64): ``s = x + bias``; returns ``relu(s)``, or ``(s, relu(s))`` with
    ``keep_sum``."""
    s = x.to(math_dtype(x.dtype))
    if bias is not None:
        s = s + bias.to(s.dtype).view(1, -1, 1, 1)
    fmt = feature_map_format(x)
    r = s.relu().to(x.dtype).contiguous(memory_format=fmt)
    if keep_sum:
        return s.to(x.dtype).contiguous(memory_format=fmt), r
    return r


def bias_relu(x: torch.Tensor, bias: torch.Tensor | None = None, *, keep_sum: bool = False,
              backend: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``relu(x + bias)`` (``bias`` per channel, optional); ``keep_sum=True`` returns
    ``(x + bias, relu(x + bias))`` from the same pass."""
    check_feature_map("bias_relu", "x", x)
    if bias is not None:
        check_channel_vector("bias_relu", "bias", bias, x.shape[1], x)
    impl = backends.implementation("bias_relu", backend, x.device)
    return impl(x, bias, keep_sum=keep_sum)


def _load_triton():
    from ..triton.bias_relu import bias_relu_triton

    return bias_relu_triton


backends.register("bias_relu", "reference", lambda: bias_relu_reference)
backends.register("bias_relu", "triton", _load_triton)
