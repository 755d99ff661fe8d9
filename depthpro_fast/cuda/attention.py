"""Python face of the CUDA op ``depthpro_fast::attention`` (csrc/attention.cpp,
kernels/attention_fwd.cu): its fake (meta) implementation and the wrapper the dispatch calls.

The kernel serves fp16 and bf16 with head dims 32, 64 and 128 (tensor-core mma.sync); other
inputs fall back, per call, to the Triton implementation (fp32 keeps fp32 accuracy there).
Importing this module loads the extension; it raises ImportError when the extension (or this op
in it) is missing.
"""

from __future__ import annotations

import torch

from .. import _ext

if _ext.load() is None:
    raise ImportError(f"depthpro_fast._C is unavailable: {_ext.unavailable_reason()}")
if not _ext.has_op("attention"):
    raise ImportError("the built extension depthpro_fast._C has no attention op (rebuild it)")

#: What the CUDA kernel is instantiated for.
DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (32, 64, 128)


@torch.library.register_fake("depthpro_fast::attention")
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    b, h, n, d = q.shape
    # (B, N, H, D)-contiguous memory seen as (B, H, N, D), like the kernel's output
    return q.new_empty((b, n, h, d)).transpose(1, 2)


def supports(q: torch.Tensor) -> bool:
    return q.dtype in DTYPES and q.shape[-1] in HEAD_DIMS


def attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """CUDA implementation of :func:`depthpro_fast.ops.attention` (same arguments)."""
    if not supports(q):
        from ..triton.attention import attention_triton

        return attention_triton(q, k, v, scale)
    return torch.ops.depthpro_fast.attention(q, k, v, scale)
