"""The FP8 format of the fp8 precision mode, and where it can run (shared by ops, kernels, engine).

- Values: ``torch.float8_e4m3fn`` (e4m3, finite-only: largest value 448, 3 mantissa bits, so a
  relative rounding step of 2^-4 near the top of each binade). e5m2 (2 mantissa bits) is for
  gradients, not inference.
- Scales: fp32, one per row, ``scale = max(amax, AMAX_FLOOR) / 448`` where ``amax`` is the
  row's largest magnitude; the quantised row is ``clamp(x * (448 / max(amax, AMAX_FLOOR)),
  -448, 448)`` rounded to nearest even. The clamp is needed: torch 2.11 turns an out-of-range
  value into NaN when it casts to e4m3fn (torch 2.13 saturates), and the reciprocal's rounding
  can put the largest element a hair above 448. An all-zero row gets a tiny positive scale and
  quantises to zeros (its dequantised values are exact zeros). ``AMAX_FLOOR`` keeps the scale a
  normal fp32 number (no division by zero, no denormal that a GPU would flush).
- Non-finite input is not clamped away: a NaN stays NaN, an inf row makes NaNs, so a broken
  activation shows up in the output instead of becoming a finite wrong number.
- Where: CUDA GPUs with FP8 tensor cores, compute capability >= 8.9 (Ada, Hopper, Blackwell),
  through ``torch._scaled_mm`` with row-wise scales; on a CPU the same arithmetic is emulated
  (for tests: slow, and with no speed benefit).
"""

from __future__ import annotations

import torch

E4M3: torch.dtype = torch.float8_e4m3fn
E4M3_MAX = 448.0
#: Smallest amax used for a scale (2^-100: scale ~ 2e-33, a normal fp32 number).
AMAX_FLOOR = 2.0 ** -100
#: FP8 tensor cores: compute capability 8.9 (Ada) and later.
MIN_CAPABILITY = (8, 9)


class Fp8UnavailableError(RuntimeError):
    """The fp8 precision mode cannot run on this device or with this PyTorch."""


def fp8_problem(device: torch.device) -> str | None:
    """Why the fp8 mode cannot run on ``device`` (None: it can; a CPU runs the emulation)."""
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return (f"this PyTorch ({torch.__version__}) has no float8_e4m3fn / torch._scaled_mm "
                "(PyTorch >= 2.1 has them)")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < MIN_CAPABILITY:
            name = torch.cuda.get_device_name(device)
            return (f"{device} ({name}) has compute capability {major}.{minor}; FP8 tensor cores "
                    f"need compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada "
                    "L4 / L40 / RTX 40xx, Hopper H100 / H200, Blackwell)")
        return None
    if device.type in ("cpu", "meta"):
        return None
    return f"fp8 runs on CUDA GPUs (and as an emulation on a CPU), not on {device.type}"


def row_scales(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, inverse)`` in fp32 for a tensor of row amaxes (the rule above)."""
    a = amax.float().clamp_min(AMAX_FLOOR)  # NaN stays NaN
    # a true division: ``448 / a`` would be torch's __rtruediv__, i.e. reciprocal(a) * 448,
    # which is not the correctly rounded quotient the kernels compute
    return a / E4M3_MAX, torch.full_like(a, E4M3_MAX) / a
