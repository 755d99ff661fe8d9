"""Per-op checks of kernel qualification: is an implementation's output, on the inputs the model
gave the op, the op's reference output within the tests' tolerances (``depthpro_fast.tolerances``)?

``check(op, args, kwargs, out, ref)`` returns None when ``out`` passes, else a short reason.
It is called with the arguments the op's face passed to its implementation (positional and
keyword, as ``ops/<op>.py`` calls it) and with the reference implementation's output on the same
inputs. Every output must have the reference's shape and dtype, and be finite wherever the
reference is: qualification poisons the memory the implementation allocates with NaN, so an
element the kernel never wrote shows as NaN ("unwritten").

``describe(args, kwargs)`` names a case by its tensors' shapes, dtypes and strides (the layouts the
model really passes, e.g. q, k, v as strided views of one packed qkv) and its other arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .tolerances import (
    ATTENTION_BUDGET_FACTOR,
    ATTENTION_FLOOR,
    EPILOGUE_REL_TOL,
    FP8_MISMATCH_FRACTION,
    FP8_SCALE_RTOL,
    MERGE_BLEND_REL,
    SPLIT_FP32_ATOL,
    e4m3_step,
    rel_err,
    ulp,
)

Check = Callable[[Sequence[Any], dict[str, Any], Any, Any], "str | None"]
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz")
                   if hasattr(torch, n))
#: attention's fp64 check runs this many (batch x head) slices at a time (bounded memory)
_ATTENTION_CHUNK = 64


def _describe_value(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        dt = str(v.dtype).removeprefix("torch.")
        shape = "x".join(map(str, v.shape)) or "scalar"
        layout = "" if v.is_contiguous() else f" stride {tuple(v.stride())}"
        if v.dim() == 4 and not v.is_contiguous() and \
                v.is_contiguous(memory_format=torch.channels_last):
            layout = " channels_last"
        off = f" +{v.storage_offset()}" if v.storage_offset() else ""
        return f"{shape} {dt}{layout}{off}"
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, float):
        return f"{v:.6g}"
    return repr(v)


def describe(args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    """A case's name: its arguments' shapes / dtypes / layouts and values, in call order."""
    parts = [_describe_value(a) for a in args]
    parts += [f"{k}={_describe_value(v)}" for k, v in sorted(kwargs.items())]
    return ", ".join(parts)


def _outputs(value: Any) -> list[torch.Tensor]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _same_form(out: Any, ref: Any) -> str | None:
    outs, refs = _outputs(out), _outputs(ref)
    if len(outs) != len(refs):
        return f"returned {len(outs)} outputs, the reference {len(refs)}"
    for i, (o, r) in enumerate(zip(outs, refs, strict=True)):
        if not isinstance(o, torch.Tensor):
            return f"output {i} is a {type(o).__name__}, not a tensor"
        if o.shape != r.shape or o.dtype != r.dtype:
            return (f"output {i} is {tuple(o.shape)} {o.dtype}, the reference "
                    f"{tuple(r.shape)} {r.dtype}")
        if o.device != r.device:
            return f"output {i} is on {o.device}, the reference on {r.device}"
    return None


def _unwritten(o: torch.Tensor, r: torch.Tensor, i: int) -> str | None:
    """NaN where the reference is finite: an element the kernel did not write (poisoned)."""
    if not (o.dtype.is_floating_point and o.numel()):
        return None
    of, rf = o.float(), r.float()
    bad = ~torch.isfinite(of) & torch.isfinite(rf)
    n = int(bad.sum())
    if n:
        return (f"output {i}: {n} of {o.numel()} elements non-finite where the reference is "
                "finite (unwritten: NaN-poisoned memory)")
    return None


def _dtype_of_first_tensor(args: Sequence[Any]) -> torch.dtype:
    for a in args:
        if isinstance(a, torch.Tensor) and a.dtype.is_floating_point:
            return a.dtype
    return torch.float32


def _tol(dtype: torch.dtype) -> float:
    return EPILOGUE_REL_TOL.get(dtype, EPILOGUE_REL_TOL[torch.float32])


def relative(factors: Sequence[float] | None = None) -> Check:
    """Each output: ``max |out - ref| / max |ref|`` within ``factor x`` the epilogue tolerance of
    the larger of its dtype's and the input's (``factors`` per output; default 1 each)."""

    def check(args, kwargs, out, ref):
        in_dtype = _dtype_of_first_tensor(args)
        for i, (o, r) in enumerate(zip(_outputs(out), _outputs(ref), strict=True)):
            if not o.dtype.is_floating_point:
                if not torch.equal(o, r):
                    return f"output {i} ({o.dtype}) differs from the reference"
                continue
            factor = factors[i] if factors is not None and i < len(factors) else 1.0
            tol = factor * max(_tol(o.dtype), _tol(in_dtype))
            err = rel_err(o, r)
            if not err <= tol:
                return f"output {i}: relative error {err:.3g} > tolerance {tol:.3g}"
        return None

    return check


def _attention(args, kwargs, out, ref):
    q, k, v, scale = args[0], args[1], args[2], float(args[3])
    b, h, n, d = q.shape
    flat = [t.reshape(b * h, n, d) for t in (q, k, v, out)]
    err = err_same = 0.0
    for s in range(0, b * h, _ATTENTION_CHUNK):
        qs, ks, vs, os_ = (t[s:s + _ATTENTION_CHUNK] for t in flat)
        exact = torch.softmax(qs.double() @ ks.double().transpose(-2, -1) * scale, -1) @ \
            vs.double()
        same = torch.softmax((qs @ ks.transpose(-2, -1)) * scale, dim=-1) @ vs
        err = max(err, float((os_.double() - exact).abs().max()))
        err_same = max(err_same, float((same.double() - exact).abs().max()))
    budget = max(ATTENTION_BUDGET_FACTOR * err_same, ATTENTION_FLOOR.get(q.dtype, 1e-7))
    if not err <= budget:
        return (f"max abs error {err:.3g} vs fp64 > budget {budget:.3g} ({ATTENTION_BUDGET_FACTOR}x"
                f" PyTorch's same-dtype attention, {err_same:.3g})")
    return None


def _split_patches(args, kwargs, out, ref):
    from .ops.split_patches import split_patches_reference

    image = args[0]
    ref32 = split_patches_reference(image, prenormalized=kwargs.get("prenormalized", False),
                                    out_dtype=torch.float32)
    o = out.float()
    if out.dtype == torch.float32:
        err = float((o - ref32).abs().max())
        return None if err <= SPLIT_FP32_ATOL else \
            f"max abs error {err:.3g} > {SPLIT_FP32_ATOL:g} (float32)"
    excess = float(((o - ref32).abs() - 0.5 * ulp(ref32, out.dtype) - 1e-6).max())
    if excess > 0:
        return f"not the float32 result correctly rounded to {out.dtype} (off by {excess:.3g})"
    return None


def _merge_patches(args, kwargs, out, ref):
    if not kwargs.get("blend", 0):
        return None if torch.equal(out, ref) else "the crop (a gather) is not bit-exact"
    o, r = out.float(), ref.float()
    peak = float(r.abs().max()) if r.numel() else 0.0
    if out.dtype == torch.float32:
        tol: Any = MERGE_BLEND_REL * peak
    else:
        tol = ulp(r, out.dtype) + MERGE_BLEND_REL * peak
    over = (o - r).abs() - tol
    if over.numel() and float(over.max()) > 0:
        return f"blend error over the tolerance by {float(over.max()):.3g}"
    return None


def _fp8(args, kwargs, out, ref):
    """(..., q, scale) outputs of the fp8 quantisers; a leading residual output (add + LN)
    is checked as the epilogues are."""
    outs, refs = _outputs(out), _outputs(ref)
    if len(outs) == 3:
        why = relative()(args, kwargs, outs[0], refs[0])
        if why:
            return "residual " + why
    q, s, q_ref, s_ref = outs[-2], outs[-1], refs[-2], refs[-1]
    if not torch.allclose(s.float(), s_ref.float(), rtol=FP8_SCALE_RTOL, atol=0):
        err = float(((s.float() - s_ref.float()).abs() / s_ref.float().abs().clamp_min(1e-30))
                    .max())
        return f"scales: relative error {err:.3g} > {FP8_SCALE_RTOL:g}"
    qf, rf = q.float(), q_ref.float()
    if not bool(torch.isfinite(qf).eq(torch.isfinite(rf)).all()):
        return "e4m3 values: non-finite where the reference is finite (unwritten?) or back"
    both = torch.isfinite(rf)
    diff = (qf - rf).abs()[both]
    if diff.numel():
        if not bool((diff <= e4m3_step(rf[both]) * 1.0001).all()):
            return "e4m3 values more than one e4m3 step from the reference"
        frac = float((diff > 0).float().mean())
        if frac > FP8_MISMATCH_FRACTION:
            return f"{frac:.2%} of the e4m3 values differ (> {FP8_MISMATCH_FRACTION:.1%})"
    return None


#: op -> its check. An op missing here gets ``DEFAULT_CHECK`` (twice the epilogue tolerance);
#: ``tests/test_qualification.py`` checks that every registered op has its own entry.
CHECKS: dict[str, Check] = {
    "attention": _attention,
    "split_patches": _split_patches,
    "merge_patches": _merge_patches,
    "layer_norm": relative((2.0,)),
    "add_layer_norm": relative((1.0, 2.0)),
    "grouped_layer_norm": relative((2.0,)),
    "grouped_add_layer_norm": relative((1.0, 2.0)),
    "bias_gelu": relative(),
    "residual_layerscale": relative(),
    "bias_relu": relative(),
    "bias_residual": relative(),
    "subpixel_tail": relative(),
    "quantize_rows": _fp8,
    "layer_norm_fp8": _fp8,
    "add_layer_norm_fp8": _fp8,
    "bias_gelu_fp8": _fp8,
}
DEFAULT_CHECK = relative((2.0, 2.0, 2.0))


def check(op: str, args: Sequence[Any], kwargs: dict[str, Any], out: Any,
          ref: Any) -> str | None:
    """None when ``out`` (an implementation's output) passes against ``ref``, else why not."""
    why = _same_form(out, ref)
    if why:
        return why
    for i, (o, r) in enumerate(zip(_outputs(out), _outputs(ref), strict=True)):
        if o.dtype not in FP8_DTYPES:
            why = _unwritten(o, r, i)
            if why:
                return why
    return CHECKS.get(op, DEFAULT_CHECK)(args, kwargs, out, ref)
