"""The op boundary: every place where the fast path differs from plain PyTorch.

Each op lives in its own file with its pure-PyTorch reference, its input checks and its
dispatch to the implementations of the selected backend (see ``depthpro_fast.backends``).
"""

from .attention import attention, attention_reference
from .merge_patches import merge_patches, merge_patches_reference
from .split_patches import split_patches, split_patches_reference

__all__ = [
    "attention",
    "attention_reference",
    "merge_patches",
    "merge_patches_reference",
    "split_patches",
    "split_patches_reference",
]
