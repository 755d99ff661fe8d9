"""Python face of the CUDA op ``depthpro_fast::merge_patches`` (csrc/merge_patches.cpp,
kernels/merge_patches.cu): its fake (meta) implementation and the wrapper the dispatch calls.

Importing this module loads the extension; it raises ImportError when the extension (or this op
in it) is missing.
"""

from __future__ import annotations

import torch

from .. import _ext
from ..op_common import merged_size, tokens_to_maps

if _ext.load() is None:
    raise ImportError(f"depthpro_fast._C is unavailable: {_ext.unavailable_reason()}")
if not _ext.has_op("merge_patches"):
    raise ImportError("the built extension depthpro_fast._C has no merge_patches op (rebuild it)")


@torch.library.register_fake("depthpro_fast::merge_patches")
def _(tokens: torch.Tensor, batch_size: int, grid: int, padding: int, blend: int = 0,
      channels_last: bool = False) -> torch.Tensor:
    maps = tokens_to_maps(tokens) if tokens.dim() == 3 else tokens
    _, c, h, w = maps.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((batch_size, c, merged_size(h, grid, padding),
                        merged_size(w, grid, padding)),
                       dtype=tokens.dtype, device=tokens.device, memory_format=fmt)


def merge_patches_cuda(tokens: torch.Tensor, *, batch_size: int, grid: int, padding: int,
                       blend: int = 0, channels_last: bool = False) -> torch.Tensor:
    """CUDA implementation of :func:`depthpro_fast.ops.merge_patches` (same arguments)."""
    return torch.ops.depthpro_fast.merge_patches(tokens, batch_size, grid, padding, blend,
                                                 channels_last)
