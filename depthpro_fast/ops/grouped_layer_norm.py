"""LayerNorm (alone, or fused with the residual write before it) over the rows of several ViTs
at once, each row with its own ViT's parameters: the elementwise passes of the lock-stepped ViTs
(``depthpro_fast/fast/lockstep.py``).

The rows of ``G`` ViTs are concatenated: ViT ``g`` owns rows ``[ends[g-1], ends[g])``
(``group_ends``: the cumulative row ends, ``ends[G-1] == M``). The parameters are stacked per
ViT, shape ``(G, C)``. Two ops share this file (and one kernel):

- ``grouped_layer_norm(x, weight, bias, eps, group_ends)``: ``LN_g(x)`` row by row.
- ``grouped_add_layer_norm(x, delta, weight, bias, eps, group_ends, delta_bias, gamma)`` ->
  ``(r, LN_g(r))`` with ``r = x + gamma_g * (delta + delta_bias_g)``: the end of a ViT branch
  (the GEMM's bias, LayerScale, residual add) fused with the LayerNorm of the next branch, as
  ``add_layer_norm`` (``ops/layer_norm.py``) does for one ViT.

``out_width`` (optional, > C): the normalised output is ``(M, out_width)``; column ``C`` holds
1 and the columns after it 0. A GEMM against weights with their bias in column ``C`` (and zeros
after) then adds the bias itself: the grouped GEMM of this PyTorch has no per-group bias, and
the lanes after ``C`` keep the row length a multiple of 16 bytes, as that GEMM requires.

Numerics: exactly those of ``add_layer_norm`` / ``layer_norm`` per row (fp32 math, residual
rounded once to the dtype of ``x``, statistics of the rounded residual).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from .layer_norm import (
    add_layer_norm_reference,
    check_delta,
    check_eps,
    check_float_tensor,
    layer_norm_reference,
    residual_update_reference,
)


def _row_groups(m: int, group_ends: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The ViT index of each row, computed on the device (no host sync: capturable)."""
    rows = torch.arange(m, device=device)
    ends = group_ends.to(device=device, dtype=torch.int64)[:-1]
    return (rows[:, None] >= ends[None, :]).sum(dim=1)


def _group_slices(group_ends: torch.Tensor) -> list[slice] | None:
    """Each ViT's rows as a slice, where the ends can be read without a host sync (not on a
    CUDA device); None on CUDA (the references then gather the parameters row by row)."""
    if group_ends.device.type == "cuda":
        return None
    ends = group_ends.tolist()
    return [slice(s, e) for s, e in zip([0, *ends[:-1]], ends, strict=True)]


def _normed_out(x: torch.Tensor, out_width: int | None) -> torch.Tensor:
    """The normalised output, with its bias lanes (1 at column C, 0 after) already written."""
    m, c = x.shape
    if out_width is None:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    out = x.new_zeros((m, out_width))
    out[:, c] = 1
    return out


def _layer_norm_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float) -> torch.Tensor:
    """LayerNorm in fp32 math with per-row affine parameters (M, C), cast to ``x.dtype``."""
    y = F.layer_norm(x.float(), (x.shape[-1],), None, None, eps)
    return (y * weight.float() + bias.float()).to(x.dtype)


def grouped_layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 eps: float, group_ends: torch.Tensor,
                                 out_width: int | None = None, *,
                                 slices: list[slice] | None | str = "auto") -> torch.Tensor:
    """Each ViT's rows normalised with its parameters: ``layer_norm_reference`` group by group,
    or (on CUDA, or ``slices=None``) with the parameters gathered per row (no host sync)."""
    c = x.shape[1]
    out = _normed_out(x, out_width)
    slices = _group_slices(group_ends) if slices == "auto" else slices
    if slices is None:
        g = _row_groups(x.shape[0], group_ends, x.device)
        out[:, :c] = _layer_norm_rows(x, weight[g], bias[g], eps)
        return out
    for i, rows in enumerate(slices):
        out[rows, :c] = layer_norm_reference(x[rows], weight[i], bias[i], eps)
    return out


def grouped_add_layer_norm_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                                     bias: torch.Tensor, eps: float, group_ends: torch.Tensor,
                                     delta_bias: torch.Tensor | None = None,
                                     gamma: torch.Tensor | None = None,
                                     out_width: int | None = None, *,
                                     slices: list[slice] | None | str = "auto",
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_layer_norm_reference`` group by group (the residual update rounded once, then the
    LayerNorm of the rounded residual), or (on CUDA, or ``slices=None``) with the parameters
    gathered per row (no host sync)."""
    c = x.shape[1]
    out = _normed_out(x, out_width)
    slices = _group_slices(group_ends) if slices == "auto" else slices
    if slices is None:
        g = _row_groups(x.shape[0], group_ends, x.device)
        r = residual_update_reference(x, delta, None if delta_bias is None else delta_bias[g],
                                      None if gamma is None else gamma[g])
        out[:, :c] = _layer_norm_rows(r, weight[g], bias[g], eps)
        return r, out
    r = torch.empty_like(x, memory_format=torch.contiguous_format)
    for i, rows in enumerate(slices):
        r[rows], out[rows, :c] = add_layer_norm_reference(
            x[rows], delta[rows], weight[i], bias[i], eps,
            None if delta_bias is None else delta_bias[i], None if gamma is None else gamma[i])
    return r, out


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------


def _check_rows_2d(op: str, x: object) -> torch.Tensor:
    check_float_tensor(op, "x", x)
    assert isinstance(x, torch.Tensor)
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"{op}: x must be 2-D (rows of all ViTs, channels) with channels > 0, "
                         f"got shape {tuple(x.shape)}")
    return x


def _check_stacked(op: str, name: str, v: object, x: torch.Tensor, groups: int) -> None:
    check_float_tensor(op, name, v)
    assert isinstance(v, torch.Tensor)
    if v.dim() != 2 or v.shape != (groups, x.shape[1]):
        raise ValueError(f"{op}: {name} must be the ViTs' vectors stacked, shape "
                         f"({groups}, {x.shape[1]}), got {tuple(v.shape)}")
    if v.device != x.device:
        raise ValueError(f"{op}: {name} is on {v.device} but x is on {x.device}")


def _check_groups(op: str, x: torch.Tensor, weight: object,
                  group_ends: object) -> int:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{op}: weight must be the ViTs' LayerNorm weights stacked, (G, C)")
    groups = weight.shape[0]
    if groups < 1:
        raise ValueError(f"{op}: at least one ViT (group), got weight of shape "
                         f"{tuple(weight.shape)}")
    if not isinstance(group_ends, torch.Tensor) or group_ends.dim() != 1 \
            or group_ends.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: group_ends must be a 1-D int32 / int64 tensor of the cumulative "
                        f"row ends of the {groups} ViTs")
    if group_ends.shape[0] != groups:
        raise ValueError(f"{op}: group_ends has {group_ends.shape[0]} entries, weight stacks "
                         f"{groups} ViTs")
    if group_ends.device != x.device:
        raise ValueError(f"{op}: group_ends is on {group_ends.device} but x is on {x.device}")
    if x.device.type == "cpu":  # on a GPU this would synchronise with the host
        ends = group_ends.tolist()
        if any(b < a for a, b in zip([0, *ends], ends, strict=False)) or ends[-1] != x.shape[0]:
            raise ValueError(f"{op}: group_ends must be non-decreasing and end at the row count "
                             f"{x.shape[0]}, got {ends}")
    return groups


def _check_width(op: str, out_width: object, x: torch.Tensor) -> int | None:
    if out_width is None:
        return None
    if isinstance(out_width, bool) or not isinstance(out_width, int) or out_width <= x.shape[1]:
        raise ValueError(f"{op}: out_width must be None or an int > {x.shape[1]} (the channels; "
                         f"column {x.shape[1]} holds the GEMM's bias lane), got {out_width!r}")
    return out_width


# ----------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------


def grouped_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       group_ends: torch.Tensor, *, out_width: int | None = None,
                       backend: str | None = None) -> torch.Tensor:
    """LayerNorm of each row of ``x`` (M, C) with the parameters of its ViT (``weight``,
    ``bias``: (G, C); ``group_ends``: (G,) cumulative row ends). ``out_width``: see module."""
    op = "grouped_layer_norm"
    _check_rows_2d(op, x)
    groups = _check_groups(op, x, weight, group_ends)
    _check_stacked(op, "weight", weight, x, groups)
    _check_stacked(op, "bias", bias, x, groups)
    eps = check_eps(op, eps)
    out_width = _check_width(op, out_width, x)
    impl = backends.implementation(op, backend, x.device)
    return impl(x, weight, bias, eps, group_ends, out_width)


def grouped_add_layer_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor, eps: float, group_ends: torch.Tensor, *,
                           delta_bias: torch.Tensor | None = None,
                           gamma: torch.Tensor | None = None, out_width: int | None = None,
                           backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + gamma_g * (delta + delta_bias_g)`` and ``LN_g(r)`` row by row, ``g`` the row's
    ViT; returns ``(r, LN(r))``. Stacked (G, C) parameters; ``out_width``: see module."""
    op = "grouped_add_layer_norm"
    _check_rows_2d(op, x)
    check_delta(op, delta, x)
    groups = _check_groups(op, x, weight, group_ends)
    _check_stacked(op, "weight", weight, x, groups)
    _check_stacked(op, "bias", bias, x, groups)
    if delta_bias is not None:
        _check_stacked(op, "delta_bias", delta_bias, x, groups)
    if gamma is not None:
        _check_stacked(op, "gamma", gamma, x, groups)
    eps = check_eps(op, eps)
    out_width = _check_width(op, out_width, x)
    impl = backends.implementation(op, backend, x.device)
    return impl(x, delta, weight, bias, eps, group_ends, delta_bias, gamma, out_width)


def _load_triton_grouped_layer_norm():
    from ..triton.grouped_layer_norm import grouped_layer_norm_triton

    return grouped_layer_norm_triton


def _load_triton_grouped_add_layer_norm():
    from ..triton.grouped_layer_norm import grouped_add_layer_norm_triton

    return grouped_add_layer_norm_triton


backends.register("grouped_layer_norm", "reference", lambda: grouped_layer_norm_reference)
backends.register("grouped_layer_norm", "triton", _load_triton_grouped_layer_norm)
backends.register("grouped_add_layer_norm", "reference",
                  lambda: grouped_add_layer_norm_reference)
backends.register("grouped_add_layer_norm", "triton", _load_triton_grouped_add_layer_norm)
