"""How far a fast / low-precision path is from the fp32 reference: the measures and the budget.

One definition shared by the tests (tests/test_fast_path.py), the benchmark table
(``depthpro-fast bench``'s MARE / FOV columns) and the fast-path ablation.
"""

from __future__ import annotations

import torch

#: The accuracy budget of the fast path vs the fp32 reference on the same weights (issue 6):
#: canonical inverse depth mean absolute relative error per dtype, and the FOV error in degrees.
MARE_BUDGET: dict[torch.dtype, float] = {torch.float16: 1e-3, torch.bfloat16: 5e-3}
FOV_BUDGET_DEG = 0.05


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
