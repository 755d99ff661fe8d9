"""Windows' tokens -> one stitched feature map (spec §2.3-2.4).

Input: the encoder tokens of ``grid * grid * batch_size`` windows, (n, 1 + h*w, C) with the class
token first (as the ViT emits them), or already (n, C, h, w) maps; window-major, image-minor
(index ``(row * grid + col) * batch_size + b``). Output: (batch_size, C, H, W) with
``H = grid * h - 2 * padding * (grid - 1)`` (same for W); window ``j`` of an axis starts at
``j * s`` in the output, ``s = h - 2 * padding`` (the window stride in tokens), and neighbouring
windows overlap by ``o = h - s = 2 * padding`` tokens.

``blend=0`` is the official hard crop (spec §2.4): at each interior window border ``padding``
tokens are dropped and the rest concatenated, i.e. the boundary between windows ``j`` and
``j + 1`` lies at ``c = (j + 1) * s + padding``, the middle of their overlap band, and every
output token is copied from exactly one window.

``blend=k > 0`` is an overlap-blend (an option for studies; the official model is trained with
the crop). On each axis, across the boundary ``c`` between windows ``j`` and ``j + 1``, the
weight of window ``j`` at output token ``Y`` (token centre ``Y + 1/2``) is the linear ramp of
width ``k`` centred on ``c``::

    w_j(Y) = clamp(1/2 + (c - (Y + 1/2)) / k, 0, 1)          w_{j+1}(Y) = 1 - w_j(Y)

so the tokens whose centres lie within ``k/2`` of the boundary mix the two windows, all others
come from the crop's window. A window's weight is the product of its two axes' weights, and the
weights of all windows sum to one at every output token (up to four windows mix at a corner).
``k = 1`` puts the ramp's ends on the two token centres next to the boundary, so it equals the
crop; ``k`` may be at most ``min(2 * padding, s)``: the ramp then stays inside the overlap band
and a window's two ramps do not meet. Windows that agree on their overlap (e.g. crops of one
image) merge to that image for every ``k``.
"""

from __future__ import annotations

import math

import torch

from .. import backends
from ..op_common import merged_size, tokens_to_maps


def max_blend(h: int, w: int, grid: int, padding: int) -> int:
    """Largest accepted ``blend``: the ramp must fit the overlap (2p) and the stride (h - 2p)."""
    if grid == 1:
        return 0
    return min(2 * padding, h - 2 * padding, w - 2 * padding)


def blend_weights(window: int, grid: int, padding: int, blend: int) -> torch.Tensor:
    """(grid, window) float64: the weight of window ``j`` at its local token ``y`` on one axis.

    ``blend=0`` gives the crop's 0/1 mask; ``blend=k`` the ramps of the module docstring.
    """
    y = torch.arange(window, dtype=torch.float64)
    if blend == 0:
        lo = (y >= padding).double()  # towards the previous window (boundary at local p)
        hi = (y < window - padding).double()  # towards the next one (boundary at window - p)
    else:
        # At a boundary c, token Y: t = 2 (c - Y) - 1 (odd; > 0 on the lower window's side)
        # and the lower window's weight is (k + t) / 2k, clamped; the upper one gets the rest.
        def lower_weight(t: torch.Tensor) -> torch.Tensor:
            return ((blend + t) / (2 * blend)).clamp(0, 1)

        hi = lower_weight(2 * (window - padding - y) - 1)
        lo = 1 - lower_weight(2 * (padding - y) - 1)
    weights = torch.ones(grid, window, dtype=torch.float64)
    if grid > 1:
        weights[1:] *= lo
        weights[:-1] *= hi
    return weights


def merge_patches_reference(tokens: torch.Tensor, *, batch_size: int, grid: int, padding: int,
                            blend: int = 0, channels_last: bool = False) -> torch.Tensor:
    """Crop-and-concatenate exactly as the official ``merge`` (``blend=0``), or the blend.

    The blend is written as what it is, a weighted sum of the windows placed at their offsets,
    accumulated in float32 and cast back to the tokens' dtype.
    """
    maps = tokens_to_maps(tokens) if tokens.dim() == 3 else tokens
    if blend:
        out = _blend_reference(maps, batch_size, grid, padding, blend)
        if channels_last:
            return out.contiguous(memory_format=torch.channels_last)
        return out
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


def _blend_reference(maps: torch.Tensor, batch_size: int, grid: int, padding: int,
                     blend: int) -> torch.Tensor:
    n, c, h, w = maps.shape
    wy = blend_weights(h, grid, padding, blend).float().to(maps.device)
    wx = blend_weights(w, grid, padding, blend).float().to(maps.device)
    sy, sx = h - 2 * padding, w - 2 * padding
    out = torch.zeros(batch_size, c, merged_size(h, grid, padding), merged_size(w, grid, padding),
                      dtype=torch.float32, device=maps.device)
    for j in range(grid):
        for i in range(grid):
            win = maps[(j * grid + i) * batch_size:(j * grid + i + 1) * batch_size].float()
            weight = wy[j][:, None] * wx[i][None, :]
            out[..., j * sy:j * sy + h, i * sx:i * sx + w] += win * weight
    return out.to(maps.dtype)


def _check(tokens: torch.Tensor, batch_size: int, grid: int, padding: int, blend: int) -> None:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"merge_patches: tokens must be a torch.Tensor, got "
                        f"{type(tokens).__name__}")
    for name, value, low in (("batch_size", batch_size, 1), ("grid", grid, 1),
                             ("padding", padding, 0), ("blend", blend, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value < low:
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
    if blend > max(max_blend(h, w, grid, padding), 1):
        raise ValueError(f"merge_patches: blend {blend} too wide for {h}x{w} windows with "
                         f"padding {padding}; accepted: 0 to "
                         f"{max(max_blend(h, w, grid, padding), 1)} "
                         "(the overlap 2*padding and the stride h - 2*padding bound it; 0 and 1 "
                         "are the crop)")


def merge_patches(tokens: torch.Tensor, *, batch_size: int, grid: int, padding: int,
                  blend: int = 0, channels_last: bool = False,
                  backend: str | None = None) -> torch.Tensor:
    """Stitch ``grid x grid`` windows per image into a (batch_size, C, H, W) map.

    ``tokens``: (grid^2 * batch_size, 1 + h*w, C) tokens, class token first, or
    (grid^2 * batch_size, C, h, w) maps; window-major, image-minor. ``padding``: tokens the crop
    drops at each interior border. ``blend``: 0 (the official crop) or the width in tokens of the
    linear overlap ramp (module docstring). ``channels_last``: return the (B, C, H, W) result in
    channels_last memory format. The result has the tokens' dtype.
    """
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
