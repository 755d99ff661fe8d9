"""Multi-head attention without mask or dropout: ``softmax(q k^T * scale) v``.

q, k, v are (B, H, N, D) with any strides, typically views into the packed qkv GEMM output
(B, N, 3, H, D). The output has shape (B, H, N, D) and (B, N, H, D)-contiguous memory, so that
``out.transpose(1, 2).reshape(B, N, H * D)`` feeds the ``proj`` GEMM without a copy.
"""

from __future__ import annotations

import math

import torch

from .. import backends
from ..op_common import check_attention_inputs as _check
from ..op_common import empty_attention_output as empty_output_like

# Bound the fp32 score matrix of the reference to about this many elements per chunk.
_REFERENCE_CHUNK_ELEMS = 1 << 26


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Pure-PyTorch attention in fp32 math, cast back to the input dtype."""
    b, h, n, _ = q.shape
    if not isinstance(b, int):
        # A symbolic batch (torch.export with a dynamic batch): one chunk, so that the graph
        # has no loop over the batch (a Python loop would fix the batch size).
        return _attention_fp32(q, k, v, scale)
    out = empty_output_like(q)
    step = max(1, _REFERENCE_CHUNK_ELEMS // max(1, h * n * k.shape[2]))
    for start in range(0, b, step):
        sl = slice(start, start + step)
        scores = torch.matmul(q[sl].float(), k[sl].float().transpose(-2, -1)) * scale
        probs = torch.softmax(scores, dim=-1)
        out[sl] = torch.matmul(probs, v[sl].float()).to(q.dtype)
    return out


def _attention_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: float) -> torch.Tensor:
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)
    return out.transpose(1, 2).contiguous().transpose(1, 2)  # (B, N, H, D)-contiguous


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """PyTorch's fused ``scaled_dot_product_attention`` (the ``torch`` backend).

    On a CPU this is its flash kernel (fp32 accumulation, online softmax): the same function as
    the reference up to rounding, without the (N, N) score matrix round trips through memory.
    On a GPU PyTorch picks among its flash / efficient / cuDNN / math kernels.
    """
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    b, h, n, d = q.shape
    if out.stride() == (n * h * d, d, h * d, 1):  # the layout the proj GEMM reads without a copy
        return out
    laid_out = empty_output_like(q)
    laid_out.copy_(out)
    return laid_out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              backend: str | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` per (batch, head); ``scale`` defaults to ``D ** -0.5``.

    ``backend`` picks ``reference``, ``torch`` (PyTorch's SDPA), ``triton``, ``cuda`` or
    ``auto`` (None).
    """
    _check(q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"attention: scale must be finite, got {scale}")
    impl = backends.implementation("attention", backend, q.device)
    return impl(q, k, v, scale)


def _load_triton():
    from ..triton.attention import attention_triton

    return attention_triton


def _load_cuda():
    from ..cuda.attention import attention_cuda

    return attention_cuda


backends.register("attention", "reference", lambda: attention_reference)
backends.register("attention", "torch", lambda: attention_sdpa)
backends.register("attention", "triton", _load_triton)
backends.register("attention", "cuda", _load_cuda)
