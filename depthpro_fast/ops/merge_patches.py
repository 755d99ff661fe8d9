"""Windows' tokens -> one stitched feature map (spec §2.3-2.4).

Input: the encoder tokens of ``grid * grid * batch_size`` windows, (n, 1 + h*w, C) with the class
token first (as the ViT emits them), or already (n, C, h, w) maps; window-major, image-minor
(index ``(row * grid + col) * batch_size + b``). ``blend=0`` is the official hard crop: at each
interior window border ``padding`` tokens are dropped and the rest concatenated.
"""

from __future__ import annotations

import math

import torch

from .. import backends


def tokens_to_maps(tokens: torch.Tensor) -> torch.Tensor:
    """(n, 1 + h*w, C) tokens (class token first) -> (n, C, h, w) maps (a view, no copy)."""
    n, t, c = tokens.shape
    side = math.isqrt(t - 1)
    return tokens[:, 1:].reshape(n, side, side, c).permute(0, 3, 1, 2)


def merge_patches_reference(tokens: torch.Tensor, *, batch_size: int, grid: int, padding: int,
                            blend: int = 0, channels_last: bool = False) -> torch.Tensor:
    """Crop-and-concatenate, exactly as the official ``merge``."""
    if blend:
        raise NotImplementedError("merge_patches: blend > 0 is not implemented yet")
    maps = tokens_to_maps(tokens) if tokens.dim() == 3 else tokens
    rows = []
    for j in range(grid):
        cols = []
        for i in range(grid):
            w = maps[(j * grid + i) * batch_size:(j * grid + i + 1) * batch_size]
            h_size, w_size = w.shape[-2:]
            top = padding if j > 0 else 0
            bottom = h_size - padding if j < grid - 1 else h_size
            left = padding if i > 0 else 0
            right = w_size - padding if i < grid - 1 else w_size
            cols.append(w[..., top:bottom, left:right])
        rows.append(torch.cat(cols, dim=-1))
    out = torch.cat(rows, dim=-2)
    if channels_last:
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def _check(tokens: torch.Tensor, batch_size: int, grid: int, padding: int, blend: int) -> None:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"merge_patches: tokens must be a torch.Tensor, got "
                        f"{type(tokens).__name__}")
    for name, value, low in (("batch_size", batch_size, 1), ("grid", grid, 1),
                             ("padding", padding, 0), ("blend", blend, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"merge_patches: {name} must be an integer >= {low}, got {value!r}")
    if tokens.dim() == 3:
        side = math.isqrt(max(tokens.shape[1] - 1, 0))
        if tokens.shape[1] < 2 or side * side != tokens.shape[1] - 1:
            raise ValueError("merge_patches: (n, T, C) tokens need T = 1 + h*w with a square "
                             f"grid (class token first), got T = {tokens.shape[1]}")
        h = w = side
    elif tokens.dim() == 4:
        h, w = tokens.shape[-2:]
    else:
        raise ValueError("merge_patches: tokens must be (n, 1 + h*w, C) or (n, C, h, w), got "
                         f"shape {tuple(tokens.shape)}")
    n = tokens.shape[0]
    if n != grid * grid * batch_size:
        raise ValueError(f"merge_patches: expected grid^2 * batch_size = {grid * grid * batch_size}"
                         f" windows, got {n}")
    if grid > 1 and 2 * padding >= min(h, w):
        raise ValueError(f"merge_patches: padding {padding} leaves nothing of a {h}x{w} window")


def merge_patches(tokens: torch.Tensor, *, batch_size: int, grid: int, padding: int,
                  blend: int = 0, channels_last: bool = False,
                  backend: str | None = None) -> torch.Tensor:
    """Stitch ``grid x grid`` windows per image into a (batch_size, C, H, W) map."""
    _check(tokens, batch_size, grid, padding, blend)
    impl = backends.implementation("merge_patches", backend, tokens.device)
    return impl(tokens, batch_size=batch_size, grid=grid, padding=padding, blend=blend,
                channels_last=channels_last)


def _load_triton():
    from ..triton.merge_patches import merge_patches_triton

    return merge_patches_triton


def _load_cuda():
    from ..cuda.merge_patches import merge_patches_cuda

    return merge_patches_cuda


backends.register("merge_patches", "reference", lambda: merge_patches_reference)
backends.register("merge_patches", "triton", _load_triton)
backends.register("merge_patches", "cuda", _load_cuda)
