"""The sub-pixel depth head's tail in one pass (fold 6 of ``fast/folds.py``).

Input: ``z``, the (N, 4P, H, W) output of the folded head's phase-major 3x3 conv, run without
its bias (channel ``g * P + p`` is output channel ``p`` of phase ``g = 2a + b``). Per low-
resolution pixel (i, j) and phase g, in fp32::

    a[p]  = relu(z[g P + p, i, j] + bias[g P + p] + border corrections at (i, j))
    y     = relu(sum_p weight[g P + p] a[p] + out_bias[g])
    out[0, 2 i + a, 2 j + b] = y                                   (the depth-to-space)

i.e. the conv's bias (with the border-aware corrections of a 3x3 conv that absorbed a constant:
``border`` is (8, 4P), rows top, bottom, left, right, top-left, top-right, bottom-left,
bottom-right, as ``folds.BorderBias``), the ReLU, the 32 -> 1 1x1 conv (``head[4]``, per phase),
its ReLU and the pixel shuffle: five passes over a 4P-channel map become one read of it and one
write of the (N, 1, 2H, 2W) depth map (rounded once to ``z``'s dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from ..op_common import check_channel_vector, check_feature_map, math_dtype

#: Rows of ``border``, in order (the fields of ``fast.folds.BorderBias``).
BORDER_ROWS = ("top", "bottom", "left", "right", "top_left", "top_right", "bottom_left",
               "bottom_right")


def border_bias_map(bias: torch.Tensor | None, border: torch.Tensor | None, channels: int,
                    h: int, w: int, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(1, 4P, H, W) in ``dtype``: the per-pixel bias of the conv, border corrections included (the
    sequence of ``folds.BorderBias.apply_``: edges subtracted, corners added back)."""
    out = torch.zeros(1, channels, h, w, dtype=dtype, device=device)
    if bias is not None:
        out += bias.to(dtype).view(1, -1, 1, 1)
    if border is not None:
        top, bottom, left, right, tl, tr, bl, br = border.to(dtype)
        out[:, :, 0, :] -= top.view(1, -1, 1)
        out[:, :, -1, :] -= bottom.view(1, -1, 1)
        out[:, :, :, 0] -= left.view(1, -1, 1)
        out[:, :, :, -1] -= right.view(1, -1, 1)
        out[:, :, 0, 0] += tl
        out[:, :, 0, -1] += tr
        out[:, :, -1, 0] += bl
        out[:, :, -1, -1] += br
    return out


def subpixel_tail_reference(z: torch.Tensor, weight: torch.Tensor, out_bias: torch.Tensor,
                            bias: torch.Tensor | None = None,
                            border: torch.Tensor | None = None) -> torch.Tensor:
    """The unfused chain in fp32 (fp64 for fp64): bias (+ border), ReLU, per-phase 1x1 conv,
    ReLU, depth-to-space; rounded once to ``z``'s dtype."""
    n, c, h, w = z.shape
    v = z.to(math_dtype(z.dtype))
    if bias is not None or border is not None:
        v = v + border_bias_map(bias, border, c, h, w, z.device, v.dtype)
    v = v.relu()
    p = c // 4
    y = F.conv2d(v, weight.to(v.dtype).view(4, p, 1, 1), out_bias.to(v.dtype), groups=4).relu()
    return F.pixel_shuffle(y, 2).to(z.dtype).contiguous()


def subpixel_tail(z: torch.Tensor, weight: torch.Tensor, out_bias: torch.Tensor, *,
                  bias: torch.Tensor | None = None, border: torch.Tensor | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """(N, 4P, H, W) raw phase-major conv output -> (N, 1, 2H, 2W) depth map (module
    docstring). ``weight``: (4P,) the 1x1 conv's weights per phase; ``out_bias``: (4,) its bias
    per phase; ``bias``: (4P,) the conv's interior bias; ``border``: (8, 4P) its corrections."""
    op = "subpixel_tail"
    check_feature_map(op, "z", z)
    c = z.shape[1]
    if c % 4 or c == 0:
        raise ValueError(f"{op}: z must have 4P channels (P per output phase, phase-major, one "
                         f"output channel), got {c} channels")
    check_channel_vector(op, "weight", weight, c, z)
    check_channel_vector(op, "out_bias", out_bias, 4, z)
    if bias is not None:
        check_channel_vector(op, "bias", bias, c, z)
    if border is not None:
        got = tuple(border.shape) if isinstance(border, torch.Tensor) else type(border).__name__
        if not isinstance(border, torch.Tensor) or border.shape != (8, c):
            raise ValueError(f"{op}: border must be an (8, {c}) tensor (rows "
                             f"{', '.join(BORDER_ROWS)}), got {got}")
        if border.device != z.device:
            raise ValueError(f"{op}: border is on {border.device} but z is on {z.device}")
    impl = backends.implementation(op, backend, z.device)
    return impl(z, weight, out_bias, bias, border)


def _load_triton():
    from ..triton.subpixel_tail import subpixel_tail_triton

    return subpixel_tail_triton


backends.register("subpixel_tail", "reference", lambda: subpixel_tail_reference)
backends.register("subpixel_tail", "triton", _load_triton)
