"""pytest-benchmark suites of depthpro_fast: collection of ``bench_*.py`` and shared helpers.

``python -m pytest bench/`` runs every benchmark once as a test (the repository's pytest options
include ``--benchmark-disable``); ``python -m pytest bench/ --benchmark-enable`` times them.
CPU-safe shapes run everywhere; GPU shapes are marked ``gpu`` and skip without CUDA.

GPU timing: 5 warm-up and 20 timed rounds, each from an idle device and ending with a
``torch.cuda.synchronize`` (pytest-benchmark's host clock is then honest), each also timed with
CUDA events: their median / min / max go to ``extra_info`` (with TFLOP/s or GB/s). Inputs are
random and rotated between rounds; never zeros.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from depthpro_fast import backends
from depthpro_fast.bench.timing import Stats

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
GPU_ROUNDS = 20
GPU_WARMUP = 5


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` here (pytest's default patterns only match ``test_*.py``)."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    patterns = parent.config.getini("python_files")
    if any(fnmatch.fnmatch(file_path.name, p) for p in patterns):
        return None  # already collected by pytest itself
    return pytest.Module.from_parent(parent, path=file_path)


def implementation_or_skip(op: str, backend: str, device: torch.device,
                           tiny: bool = True) -> Callable[..., Any]:
    """The ``backend`` implementation of ``op`` on ``device``, or skip the test saying why.

    On a CPU, Triton runs only in its interpreter: only for ``tiny`` shapes, and only when the
    op's Triton module exists.
    """
    if device.type == "cpu" and backend == "triton":
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
        if importlib.util.find_spec(f"depthpro_fast.triton.{op}") is None:
            pytest.skip(f"depthpro_fast.triton.{op} does not exist (yet)")
        if not tiny:
            pytest.skip("shape too large for the Triton interpreter on a CPU")
    ok, why = backends.backend_status(backend, device)
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable: {why}")
    try:
        return backends.implementation(op, backend, device)
    except Exception as e:  # unavailable, missing module, failed import
        pytest.skip(f"{backend} {op}: {e}")


def rotating(inputs: Sequence[Any]) -> Callable[[], tuple[tuple, dict]]:
    """A pytest-benchmark ``setup`` that hands out ``inputs`` in turn (as the only argument)."""
    counter = itertools.count()
    return lambda: ((inputs[next(counter) % len(inputs)],), {})


def run_benchmark(benchmark, fn: Callable[[Any], Any], inputs: Sequence[Any],
                  device: torch.device, *, flops: float | None = None,
                  bytes_moved: float | None = None, rounds: int | None = None,
                  warmup: int | None = None) -> Any:
    """Benchmark ``fn(x)`` over rotating ``inputs``; returns one result of ``fn``.

    On a GPU every round starts from an idle device and ends with a synchronize (so the host
    timing of pytest-benchmark is honest), and is also timed with CUDA events; when benchmarking
    is enabled their median, min and max go to ``benchmark.extra_info`` with the achieved
    TFLOP/s or GB/s when ``flops`` / ``bytes_moved`` per call are given.
    """
    gpu = device.type == "cuda"
    rounds = rounds or (GPU_ROUNDS if gpu else 3)
    warmup = (GPU_WARMUP if gpu else 0) if warmup is None else warmup
    event_ms: list[float] = []

    def target(x):
        if not gpu:
            return fn(x)
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(x)
        end.record()
        end.synchronize()
        event_ms.append(start.elapsed_time(end))
        return out

    result = benchmark.pedantic(target, setup=rotating(inputs), rounds=rounds,
                                warmup_rounds=warmup, iterations=1)
    timed = event_ms[warmup:]  # pedantic calls target for the warm-up rounds first
    if gpu and not getattr(benchmark, "disabled", True) and timed:
        stats = Stats(timed)
        benchmark.extra_info.update({"cuda_median_ms": stats.median, "cuda_min_ms": stats.min,
                                     "cuda_max_ms": stats.max, "cuda_runs": stats.runs})
        if flops:
            benchmark.extra_info["tflops"] = flops / (stats.median * 1e-3) / 1e12
        if bytes_moved:
            benchmark.extra_info["gb_per_s"] = bytes_moved / (stats.median * 1e-3) / 1e9
    return result


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
