"""LayerNorm with fp32 statistics, alone or fused with the residual write before it.

Two ops share this file because they share one kernel (the fused one has a residual prologue):

- ``layer_norm(x, weight, bias, eps, shift=None, out_dtype=None)``: ``LN(x + shift)`` over the
  last axis, written in ``out_dtype`` (default: the dtype of ``x``). ``shift`` is an optional
  per-channel vector added in fp32 before the statistics: the fused ViT with
  ``FastOptions.residual_in_gemm`` carries the proj / fc2 biases that way (its residual stream
  lacks their running sum), and ``out_dtype`` lets an fp32 residual stream
  (``residual_fp32``) feed a 16-bit GEMM in the same pass.
- ``add_layer_norm(x, delta, weight, bias, eps, delta_bias=None, gamma=None)`` ->
  ``(r, LN(r))`` with ``r = x + gamma * (delta + delta_bias)``: the end of a ViT attention or MLP
  branch (the bias of the ``proj`` / ``fc2`` GEMM, LayerScale and the residual add) fused with the
  LayerNorm that starts the next branch. One read of ``x`` and ``delta``, one write of the new
  residual stream ``r`` and of its normalised copy, instead of four passes.

``delta`` has the dtype of ``x``, or is 16-bit with an fp32 ``x``: the output of a bf16 GEMM added
to an fp32 residual stream (``FastOptions.gemm_dtype``), widened inside the pass.

Implementations: ``reference`` (the unfused chain in fp32), ``triton`` (one kernel) and, for an
fp32 ``x``, ``torch``: the same math in fewer memory passes on a CPU (``delta + delta_bias``
widened in one pass, then ``x + gamma * d`` in place with ``addcmul``, then the LayerNorm: three
passes and two new tensors, where the reference's chain makes five and four).

Numerics (every implementation): the residual update is computed in fp32 and rounded once to the
dtype of ``x``; the LayerNorm statistics (mean, biased variance) are fp32 and are taken of the
*rounded* residual, so ``normed`` is exactly ``LN`` of the ``r`` that is returned, as in the
unfused chain. Outputs have the shape of ``x`` and its dtype (``layer_norm``'s normalised
output: ``out_dtype`` when given). With ``shift``, ``x + shift`` is *not* rounded before the
statistics (it is not a tensor anyone keeps).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import backends

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         eps: float, shift: torch.Tensor | None = None,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm of ``x + shift`` over the last axis in fp32 math, cast to ``out_dtype``
    (default ``x.dtype``)."""
    n = x.shape[-1]
    xf = x.float() if shift is None else x.float() + shift.float()
    out = F.layer_norm(xf, (n,), weight.float(), bias.float(), eps)
    return out.to(out_dtype or x.dtype)


def residual_update_reference(x: torch.Tensor, delta: torch.Tensor,
                              delta_bias: torch.Tensor | None,
                              gamma: torch.Tensor | None) -> torch.Tensor:
    """``x + gamma * (delta + delta_bias)`` in fp32 math, rounded once to ``x.dtype``."""
    d = delta.float()
    if delta_bias is not None:
        d = d + delta_bias.float()
    if gamma is not None:
        d = d * gamma.float()
    return (x.float() + d).to(x.dtype)


def add_layer_norm_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor, eps: float,
                             delta_bias: torch.Tensor | None = None,
                             gamma: torch.Tensor | None = None,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused chain: residual update, then LayerNorm of the rounded result."""
    r = residual_update_reference(x, delta, delta_bias, gamma)
    return r, layer_norm_reference(r, weight, bias, eps)


def add_layer_norm_torch(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor, eps: float, delta_bias: torch.Tensor | None = None,
                         gamma: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's math for an fp32 ``x`` in three passes (module docstring); a 16-bit
    ``x`` (whose update is rounded once, from fp32) takes the reference."""
    if x.dtype != torch.float32:
        return add_layer_norm_reference(x, delta, weight, bias, eps, delta_bias, gamma)
    if delta_bias is not None:
        d = torch.add(delta, delta_bias.float())  # a 16-bit delta is widened in this pass
    else:
        d = delta.to(torch.float32, copy=True)
    if gamma is None:
        r = d.add_(x)
    else:
        r = torch.addcmul(x, d, gamma.float(), out=d)
    normed = F.layer_norm(r, (x.shape[-1],), weight.float(), bias.float(), eps)
    return r, normed


def check_float_tensor(op: str, name: str, t: object) -> torch.Tensor:
    """``t``: a torch tensor of a float dtype the LayerNorm ops accept."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; accepted: float32, float16, "
                        "bfloat16")
    return t


def check_vector(op: str, name: str, v: object, x: torch.Tensor) -> None:
    """A per-channel parameter: 1-D, the width of ``x``, on its device."""
    check_float_tensor(op, name, v)
    assert isinstance(v, torch.Tensor)
    if v.dim() != 1 or v.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: {name} must be 1-D of length {x.shape[-1]} (the last axis of "
                         f"x), got shape {tuple(v.shape)}")
    if v.device != x.device:
        raise ValueError(f"{op}: {name} is on {v.device} but x is on {x.device}")


def check_rows(op: str, x: object) -> None:
    """``x``: a float tensor with at least one axis and a non-empty last axis."""
    check_float_tensor(op, "x", x)
    assert isinstance(x, torch.Tensor)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last axis, got shape {tuple(x.shape)}")


def check_delta(op: str, delta: object, x: torch.Tensor) -> None:
    check_float_tensor(op, "delta", delta)
    assert isinstance(delta, torch.Tensor)
    if delta.shape != x.shape:
        raise ValueError(f"{op}: delta must have the shape of x {tuple(x.shape)}, got "
                         f"{tuple(delta.shape)}")
    if delta.dtype != x.dtype and not (x.dtype == torch.float32
                                       and delta.dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(f"{op}: delta must have the dtype of x ({x.dtype}), or be float16 / "
                        f"bfloat16 with a float32 x; got {delta.dtype}")
    if delta.device != x.device:
        raise ValueError(f"{op}: delta is on {delta.device} but x is on {x.device}")


def check_eps(op: str, eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a number, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{op}: eps must be finite and > 0, got {eps}")
    return eps


def check_add_layer_norm(op: str, x: object, delta: object, weight: object, bias: object,
                         eps: object, delta_bias: object = None, gamma: object = None) -> float:
    """The arguments of ``add_layer_norm`` (and its fp8 form): rows ``x``, ``delta`` like
    ``x``, per-channel ``weight``, ``bias`` and the optional ``delta_bias``, ``gamma``; returns
    ``eps`` as a float."""
    check_rows(op, x)
    assert isinstance(x, torch.Tensor)
    check_delta(op, delta, x)
    check_vector(op, "weight", weight, x)
    check_vector(op, "bias", bias, x)
    if delta_bias is not None:
        check_vector(op, "delta_bias", delta_bias, x)
    if gamma is not None:
        check_vector(op, "gamma", gamma, x)
    return check_eps(op, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, *,
               shift: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
               backend: str | None = None) -> torch.Tensor:
    """LayerNorm of ``x + shift`` over its last axis (affine ``weight``, ``bias``), fp32
    statistics, written in ``out_dtype`` (default: ``x.dtype``). ``shift``: an optional
    per-channel vector (see the module docstring)."""
    check_rows("layer_norm", x)
    check_vector("layer_norm", "weight", weight, x)
    check_vector("layer_norm", "bias", bias, x)
    if shift is not None:
        check_vector("layer_norm", "shift", shift, x)
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"layer_norm: out_dtype must be float32, float16 or bfloat16, got "
                        f"{out_dtype}")
    eps = check_eps("layer_norm", eps)
    impl = backends.implementation("layer_norm", backend, x.device)
    if shift is None and out_dtype is None:
        return impl(x, weight, bias, eps)
    return impl(x, weight, bias, eps, shift, out_dtype)


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float, *, delta_bias: torch.Tensor | None = None,
                   gamma: torch.Tensor | None = None,
                   backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + gamma * (delta + delta_bias)`` and ``LN(r)``; returns ``(r, LN(r))``.

    ``delta_bias`` (a GEMM's bias) and ``gamma`` (LayerScale) are optional per-channel vectors.
    """
    op = "add_layer_norm"
    eps = check_add_layer_norm(op, x, delta, weight, bias, eps, delta_bias, gamma)
    if delta.dtype != x.dtype:
        # a 16-bit delta on an fp32 stream: the implementations that widen it themselves
        # (the kernels take one dtype)
        impl = (add_layer_norm_reference if backend == "reference"
                else add_layer_norm_torch)
        return impl(x, delta, weight, bias, eps, delta_bias, gamma)
    impl = backends.implementation(op, backend, x.device)
    return impl(x, delta, weight, bias, eps, delta_bias, gamma)


def _load_triton_layer_norm():
    from ..triton.layer_norm import layer_norm_triton

    return layer_norm_triton


def _load_triton_add_layer_norm():
    from ..triton.layer_norm import add_layer_norm_triton

    return add_layer_norm_triton


backends.register("layer_norm", "reference", lambda: layer_norm_reference)
backends.register("layer_norm", "triton", _load_triton_layer_norm)
backends.register("add_layer_norm", "reference", lambda: add_layer_norm_reference)
backends.register("add_layer_norm", "torch", lambda: add_layer_norm_torch)
backends.register("add_layer_norm", "triton", _load_triton_add_layer_norm)
