"""Python face of the CUDA op ``depthpro_fast::split_patches`` (csrc/split_patches.cpp,
kernels/split_patches.cu): its fake (meta) implementation and the wrapper the dispatch calls.

Importing this module loads the extension; it raises ImportError when the extension (or this op
in it) is missing.
"""

from __future__ import annotations

import torch

from .. import _ext
from ..op_common import windows_per_image

if _ext.load() is None:
    raise ImportError(f"depthpro_fast._C is unavailable: {_ext.unavailable_reason()}")
if not _ext.has_op("split_patches"):
    raise ImportError("the built extension depthpro_fast._C has no split_patches op (rebuild it)")

# The kernel hard-codes the official pyramid (5x5 + 3x3 + 1 windows of 384 px).
assert windows_per_image() == 35


@torch.library.register_fake("depthpro_fast::split_patches")
def _(image: torch.Tensor, prenormalized: bool = False,
      out_dtype: torch.dtype | None = None) -> torch.Tensor:
    if out_dtype is None:
        out_dtype = image.dtype if image.dtype.is_floating_point else torch.float32
    return image.new_empty((windows_per_image() * image.shape[0], 3, 384, 384), dtype=out_dtype)


def split_patches_cuda(image: torch.Tensor, *, prenormalized: bool = False,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """CUDA implementation of :func:`depthpro_fast.ops.split_patches` (same arguments)."""
    return torch.ops.depthpro_fast.split_patches(image, prenormalized, out_dtype)
