"""How things are timed: the statistics of timed runs, the timer, random inputs, peak matmul.

Rules (DESIGN.md §5, anchors.md §5.9): on a GPU every run is timed with CUDA events around it,
starting from an idle device (``synchronize`` before the start event, the end event waited on),
after warm-up; the median is reported with the min-max spread. On a CPU the host clock
(``perf_counter``) is used. Inputs are pre-generated random tensors (never zeros), rotated
between runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..cpu import proc_kib_field

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32``, ``fp16``, ``bf16`` (other dtypes: torch's name without ``torch.``)."""
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


@contextlib.contextmanager
def tf32_disabled() -> Iterator[None]:
    """Inside: fp32 matmuls (cuBLAS) and convolutions (cuDNN) in full fp32, not TF32.

    torch leaves cuDNN's TF32 on by default (its convolutions then round their inputs to a
    10-bit mantissa, ~1e-3 relative error), so an fp32 reference timed under the defaults is
    a TF32 reference. Both flags are restored on the way out, whatever they were.
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def tf32_state() -> str:
    """TF32 as set now: ``off``, ``on``, or ``matmul on, cudnn off`` (the two differ)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if matmul == cudnn:
        return "on" if matmul else "off"
    return f"matmul {'on' if matmul else 'off'}, cudnn {'on' if cudnn else 'off'}"


@dataclasses.dataclass
class Stats:
    """Times of the timed runs (milliseconds) and their summary."""

    times_ms: list[float]

    @property
    def runs(self) -> int:
        return len(self.times_ms)

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min(self) -> float:
        return min(self.times_ms)

    @property
    def max(self) -> float:
        return max(self.times_ms)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times_ms)

    def to_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "median_ms": self.median, "min_ms": self.min,
                "max_ms": self.max, "mean_ms": self.mean,
                "times_ms": [round(t, 4) for t in self.times_ms]}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[torch.Tensor], Any], inputs: Sequence[torch.Tensor], *,
                  warmup: int, runs: int, device: torch.device) -> tuple[Stats, Stats]:
    """Time ``fn(x)`` over ``runs`` runs after ``warmup`` untimed ones, rotating ``inputs``.

    Returns (device times, host times). On a CUDA device the device times come from CUDA
    events recorded around each run, and every run starts on an idle device, so a run's time is
    its latency including the host's launch overhead; the host times are ``perf_counter`` around
    the same runs (after a synchronize). On a CPU both are the host times.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not inputs:
        raise ValueError("inputs must hold at least one tensor")
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    synchronize(device)
    device_ms, host_ms = [], []
    for i in range(runs):
        x = inputs[(warmup + i) % len(inputs)]
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            host_ms.append((time.perf_counter() - t0) * 1e3)
            device_ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(x)
            host_ms.append((time.perf_counter() - t0) * 1e3)
    return Stats(device_ms or host_ms), Stats(host_ms)


def random_inputs(shape: Sequence[int], *, count: int, device: torch.device, dtype: torch.dtype,
                  seed: int = 0, low: float = -1.0, high: float = 1.0) -> list[torch.Tensor]:
    """``count`` different uniform random tensors in [low, high) (never zeros).

    Drawn on ``device`` itself (its own seeded generator), so that the large inputs of the GPU
    benchmarks cost no host time; the values depend on the device type, the seed fixes them.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(count):
        t = torch.rand(tuple(shape), generator=gen, dtype=torch.float32, device=device)
        out.append((t * (high - low) + low).to(dtype=dtype))
    return out


def peak_matmul_tflops(device: torch.device, dtype: torch.dtype | None = None,
                       n: int | None = None, runs: int | None = None) -> dict[str, Any]:
    """The matmul rate this device reaches right now: a large (n x n) @ (n x n) product.

    GPU: bf16, n = 8192, 20 timed runs (CUDA events, median) after about 0.5 s of warm-up
    (clocks ramp up). CPU: fp32 (or ``dtype``), n = 2048, 3 runs.
    Returns ``{"tflops", "dtype", "n", "median_ms"}``.
    """
    gpu = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    n = n or (8192 if gpu else 2048)
    runs = runs or (20 if gpu else 3)
    pairs = [random_inputs((2, n, n), count=1, device=device, dtype=dtype, seed=s)[0]
             for s in (101, 102)]

    def matmul(ab: torch.Tensor) -> torch.Tensor:
        return torch.matmul(ab[0], ab[1])

    warmup = 1
    if gpu:
        # an idle GPU runs at low clocks: keep it busy for about half a second first
        matmul(pairs[0])
        synchronize(device)
        t0 = time.perf_counter()
        matmul(pairs[1])
        synchronize(device)
        warmup = max(5, math.ceil(0.5 / max(time.perf_counter() - t0, 1e-6)))
    stats, _ = time_callable(matmul, pairs, warmup=warmup, runs=runs, device=device)
    del pairs
    return {"tflops": 2 * n ** 3 / (stats.median * 1e-3) / 1e12, "dtype": dtype_name(dtype),
            "n": n, "median_ms": stats.median}


def floor_peak(device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(the peak that sets the FLOP floor, the CPU's fp32 peak or the GPU's peak)``.

    A GPU: its bf16 rate, both times. A CPU: the fp32 rate, and where the CPU has bf16
    arithmetic (AVX512_BF16, AMX) the bf16 rate too, the faster setting the floor, as on a GPU
    (with the fp32 rate the bf16 rows of an AMX Xeon read 300 % of the "floor"). The fp32 rate
    stays the one that estimates an fp32 forward's time."""
    from ..api import cpu_has_native

    peak = peak_matmul_tflops(device)
    if device.type != "cpu" or not cpu_has_native(torch.bfloat16):
        return peak, peak
    bf16 = peak_matmul_tflops(device, torch.bfloat16)
    return (bf16 if bf16["tflops"] > peak["tflops"] else peak), peak


class CpuPeakRss:
    """The process's peak resident memory over a span (Linux: VmHWM, reset via clear_refs).

    On a CPU the model's weights, activations and PyTorch's allocator caches all live in the
    process's resident memory, so its high-water mark over a row is the row's peak memory
    (weights included, like the GPU column). Where the reset is not possible (not Linux, or
    /proc not writable) ``read()`` returns None rather than the lifetime peak of the process.
    """

    def __init__(self) -> None:
        self.resettable = False

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)
            self.resettable = True
        except OSError:
            self.resettable = False

    def read(self) -> int | None:
        return proc_kib_field("/proc/self/status", "VmHWM") if self.resettable else None
