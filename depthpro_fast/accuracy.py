"""How far a fast / low-precision path is from the fp32 reference: the measures and the budget.

One definition shared by the tests (tests/test_fast_path.py), the benchmark table
(``depthpro-fast bench``'s MARE / FOV columns) and the fast-path ablation.
"""

from __future__ import annotations

import torch

#: The accuracy budget of the fast path vs the fp32 reference on the same weights:
#: canonical inverse depth mean absolute relative error per dtype, and the FOV error in degrees.
MARE_BUDGET: dict[torch.dtype, float] = {torch.float16: 1e-3, torch.bfloat16: 5e-3}
FOV_BUDGET_DEG = 0.05

#: The fp8 mode's budget (e4m3 ViT GEMMs, per-token / per-channel scales, bf16
#: elsewhere), vs the fp32 reference on the same weights. Measured on a CPU (the emulation: the
#: GPU's e4m3 values and scales, fp32 accumulation): tiny config MARE 1.5e-3, FOV error 0.048
#: deg (the same as the bf16 fast path to 3 digits: with random weights the ViT branches move
#: the residual stream by ~5 % and the head's output is near-constant, so bf16 rounding of the
#: output dominates; the ViT's own output error is 0.74 % in fp8 against 0.57 % in bf16).
#: Full size (seeded random weights, one input): MARE 1.056e-3, FOV error 0.0077 deg, equal to
#: the bf16 fast path's on the same input to 4 digits (docs/fast_path.md, "FP8 mode").
FP8_MARE_BUDGET = 1e-2
FP8_FOV_BUDGET_DEG = 0.3


def mean_abs_rel_error(out: torch.Tensor, ref: torch.Tensor, *, eps: float = 1e-6) -> float:
    """Mean over all elements of ``|out - ref| / max(|ref|, eps)``, in float64.

    Meant for canonical inverse depth maps (positive after the head's ReLU; ``eps`` keeps the
    rare exact zeros from dividing by zero).
    """
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(out.shape)} vs {tuple(ref.shape)}")
    out, ref = out.detach().double(), ref.detach().to(out.device).double()
    return float(((out - ref).abs() / ref.abs().clamp_min(eps)).mean())


def max_abs_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest ``|out - ref|`` (e.g. of FOV estimates in degrees), in float64."""
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(out.shape)} vs {tuple(ref.shape)}")
    out, ref = out.detach().double(), ref.detach().to(out.device).double()
    return float((out - ref).abs().max()) if out.numel() else 0.0


def signal_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref - mean(ref)||`` per image, the largest, in float64.

    The error relative to the map's variation around its mean: with random weights the
    canonical inverse depth is nearly constant (the head's bias), so MARE then measures little
    more than the rounding of the output; this measure sees what changed the picture.
    """
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(out.shape)} vs {tuple(ref.shape)}")
    o = out.detach().double().reshape(out.shape[0], -1)
    r = ref.detach().to(out.device).double().reshape(ref.shape[0], -1)
    spread = (r - r.mean(dim=1, keepdim=True)).norm(dim=1).clamp_min(1e-30)
    return float(((o - r).norm(dim=1) / spread).max())
