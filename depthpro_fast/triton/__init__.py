"""Triton kernels of the fast path, one fused op per file (reference in ``depthpro_fast/ops``).

Importing a module here imports Triton; the op files import them lazily.
"""
