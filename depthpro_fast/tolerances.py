"""How close an op's implementation must be to its reference: one set of numbers for the op
tests (``tests/test_*.py``) and for kernel qualification on the user's device
(``depthpro_fast/qualification_cases.py``).

All errors are measured against the op's PyTorch reference on the same inputs.
"""

from __future__ import annotations

import torch

#: Elementwise epilogues (LayerNorm (+ residual, + shift), bias + GELU, residual + LayerScale,
#: the decoder's bias + ReLU / residual passes, the sub-pixel tail, the grouped LayerNorms):
#: ``max |out - ref| / max |ref|`` per output, one rounding of the output dtype plus fp32 noise.
#: A LayerNorm's normalised output is allowed twice this (statistics in another order).
EPILOGUE_REL_TOL: dict[torch.dtype, float] = {torch.float32: 2e-6, torch.float16: 2e-3,
                                              torch.bfloat16: 1.6e-2}

#: Attention (DESIGN.md section 4): max abs error against an fp64 reference at most this many
#: times that of PyTorch's naive attention in the input dtype ...
ATTENTION_BUDGET_FACTOR = 2.0
#: ... or this absolute floor (a fraction of an ulp at 1) where that baseline is exact.
ATTENTION_FLOOR: dict[torch.dtype, float] = {torch.float32: 1e-7, torch.float16: 1e-5,
                                             torch.bfloat16: 1e-4}

#: split_patches: max abs error of a float32 output against the float32 reference; 16-bit
#: outputs must be the float32 result correctly rounded (half an ulp, plus this).
SPLIT_FP32_ATOL = 2e-6

#: merge_patches with a blend: 1e-6 of max |x| in float32 (16 bits: one ulp of the output
#: plus that); the crop (``blend=0``) is a gather: bit-exact.
MERGE_BLEND_REL = 1e-6

#: fp8 quantisers: the scales' relative tolerance (fp32 math in another order), and the
#: largest fraction of e4m3 values that may differ (each by at most one e4m3 step).
FP8_SCALE_RTOL = 2e-6
FP8_MISMATCH_FRACTION = 2e-3


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at the magnitude of ``x`` (float32 out)."""
    info = torch.finfo(dtype)
    _, exp = torch.frexp(x.float().abs())
    return torch.ldexp(torch.full_like(x, info.eps, dtype=torch.float32), exp - 1).clamp_min(
        info.tiny * info.eps)


def e4m3_step(v: torch.Tensor) -> torch.Tensor:
    """The spacing of e4m3 values around |v| (3 mantissa bits; subnormal step 2^-9)."""
    e = torch.floor(torch.log2(v.abs().float().clamp_min(2.0 ** -6)))
    return torch.exp2(e - 3)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` in float64 (0 for empty tensors)."""
    if out.numel() == 0:
        return 0.0
    return float((out.double() - ref.double()).abs().max()
                 / ref.double().abs().max().clamp_min(1e-30))
