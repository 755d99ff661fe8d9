"""The floor of ``bench --breakdown``: what this machine reaches right now, in the same process.

- **GEMM**, at a ViT-L linear's shape ((rows x 1024) @ (1024 x 4096), fc1's), per dtype: fp32
  ``F.linear``; bf16 the better of ``F.linear`` and oneDNN's ``_linear_pointwise`` on a weight
  prepacked by ``torch.ops.mkldnn._reorder_linear_weight`` (best of ``runs`` each).
- **conv**: a 3x3 conv 256->256, channels_last, at a decoder-like size, per dtype.
- **bandwidth**: a large ``copy_`` (bytes read + written over the time).

Each category's floor is then its FLOPs at the rate of the dtype it ran in, or its bytes at
the bandwidth (``breakdown.py``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .timing import dtype_name

#: (rows, in, out) of the floor's GEMM: ViT-L's fc1 over 4 windows of 577 tokens (big enough
#: for a CPU's steady rate, about 19 GFLOP)
VIT_L_GEMM = (2308, 1024, 4096)
#: (batch, channels, height, width) of the floor's 3x3 conv (256 channels: the decoder's)
DECODER_CONV = (1, 256, 96, 96)
#: bytes of the bandwidth probe's source tensor
COPY_BYTES = 256 * 2**20

#: the profiler's dtype names of the dtypes the floor measures
PROFILER_DTYPES = {torch.float32: "float", torch.bfloat16: "c10::BFloat16",
                   torch.float16: "c10::Half"}


@dataclasses.dataclass
class Floor:
    """Rates measured now: GFLOP/s per profiler dtype name for GEMMs and convs, and GB/s."""

    gemm_gflops: dict[str, float]
    conv_gflops: dict[str, float]
    bandwidth_gbs: float
    #: how each rate was measured (shapes, which implementation won)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def rate(self, kind: str, dtype: str | None) -> float | None:
        """GFLOP/s of ``kind`` (``gemm`` / ``conv``) in ``dtype`` (else the fp32 rate)."""
        table = self.gemm_gflops if kind == "gemm" else self.conv_gflops
        return table.get(dtype or "float") or table.get("float")

    def to_dict(self) -> dict[str, Any]:
        return {"gemm_gflops": dict(self.gemm_gflops), "conv_gflops": dict(self.conv_gflops),
                "bandwidth_gbs": self.bandwidth_gbs, "details": dict(self.details)}


def best_seconds(fn: Callable[[], Any], runs: int = 3) -> float:
    """The fastest of ``runs`` calls of ``fn`` after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_rates(dtype: torch.dtype, shape: Sequence[int] = VIT_L_GEMM,
               runs: int = 3) -> dict[str, float]:
    """GFLOP/s of the GEMM implementations for ``dtype`` at ``shape`` (rows, in, out)."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    flops = 2 * m * k * n
    out = {"F.linear": flops / best_seconds(lambda: F.linear(x, w), runs) / 1e9}
    if dtype == torch.bfloat16:
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
            out["onednn prepacked"] = flops / best_seconds(
                lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
                runs) / 1e9
        except (RuntimeError, AttributeError) as e:  # a PyTorch without oneDNN's linear
            out["onednn prepacked"] = 0.0
            out["onednn_error"] = str(e).splitlines()[0]  # type: ignore[assignment]
    return out


def conv_rate(dtype: torch.dtype, shape: Sequence[int] = DECODER_CONV, runs: int = 3) -> float:
    """GFLOP/s of a 3x3 conv C->C (padding 1, channels_last) on ``shape`` (B, C, H, W)."""
    b, c, h, w = shape
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(b, c, h, w, generator=gen).to(dtype).contiguous(
        memory_format=torch.channels_last)
    weight = torch.randn(c, c, 3, 3, generator=gen).to(dtype).contiguous(
        memory_format=torch.channels_last)
    flops = 2 * b * c * h * w * c * 9
    return flops / best_seconds(lambda: F.conv2d(x, weight, padding=1), runs) / 1e9


def bandwidth(n_bytes: int = COPY_BYTES, runs: int = 3) -> float:
    """GB/s of a ``copy_`` of ``n_bytes`` (read + write counted)."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    return 2 * n_bytes / best_seconds(lambda: dst.copy_(src), runs) / 1e9


def measure_floor(dtypes: Sequence[torch.dtype], *, gemm_shape: Sequence[int] = VIT_L_GEMM,
                  conv_shape: Sequence[int] = DECODER_CONV, copy_bytes: int = COPY_BYTES,
                  runs: int = 3) -> Floor:
    """The floor rates for ``dtypes`` (fp32 always: the fp32 parts of any row)."""
    wanted = list(dict.fromkeys([torch.float32, *dtypes]))
    gemm, conv, details = {}, {}, {"gemm_shape": list(gemm_shape),
                                   "conv_shape": list(conv_shape), "copy_bytes": copy_bytes,
                                   "runs": runs, "threads": torch.get_num_threads()}
    for dt in wanted:
        name = PROFILER_DTYPES.get(dt)
        if name is None:
            raise ValueError(f"the breakdown's floor measures float32, bfloat16 and float16, "
                             f"got {dt}")
        rates = gemm_rates(dt, gemm_shape, runs)
        numbers = {k: v for k, v in rates.items() if isinstance(v, float)}
        best = max(numbers, key=numbers.get)
        gemm[name] = numbers[best]
        details[f"gemm_{dtype_name(dt)}"] = {**{k: (round(v, 1) if isinstance(v, float) else v)
                                                for k, v in rates.items()}, "best": best}
        conv[name] = conv_rate(dt, conv_shape, runs)
    return Floor(gemm, conv, bandwidth(copy_bytes, runs), details)
