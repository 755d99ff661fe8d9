"""The fast path: how a loaded DepthPro is prepared for fast inference.

- ``engine``: ``FastEngine`` / ``FastOptions``, the fast forward (attached by
  ``DepthPro.prepare_fast`` or ``depthpro_fast.load(..., fast=True)``).
- ``vit``: the ViT forward with fused epilogues (or ``torch.compile`` of each block).
- ``folds``: exact algebraic folds of the linear conv chains, with their formulas.
- ``graphs``: the CUDA-graph runner (capture once per shape, replay, eager fallback).

Importing this package does not import Triton (the epilogue ops load their kernels lazily).
"""

from .engine import FastEngine, FastOptions

__all__ = ["FastEngine", "FastOptions"]
