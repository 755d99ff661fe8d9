"""Whole-model benchmarks: one forward of DepthPro (random weights), reference vs fast backends.

CPU: the tiny config (the fixtures' model: same structure, 159 GFLOP per image), fp32. GPU: the
official config (19.25 TFLOP per image), batch 1 and 8, in bf16 for every backend plus the fp32
reference. ``extra_info`` gets the CUDA-event median and the TFLOP/s reached. For the full
side-by-side table (torch.compile, CUDA graphs, transformers, % of the measured floor) use
``depthpro-fast bench``.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.conftest import HAS_CUDA, requires_cuda, run_benchmark
from depthpro_fast import backends
from depthpro_fast.api import load
from depthpro_fast.bench.timing import random_inputs
from depthpro_fast.bench.variants import resolved_ops
from depthpro_fast.config import IMG_SIZE
from depthpro_fast.flops import count_flops

_MODELS: dict[tuple[str, str, torch.dtype], torch.nn.Module] = {}


@functools.cache
def _flops_per_image(config: str) -> float:
    return count_flops(config).per_image


def _model(config: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    key = (config, str(device), dtype)
    if key not in _MODELS:
        _MODELS.clear()  # one model at a time
        _MODELS[key] = load(None, config=config, device=device, dtype=dtype,
                            backend="reference")[0]
    return _MODELS[key]


@pytest.fixture(scope="module", autouse=True)
def _release_models():
    yield
    _MODELS.clear()
    if HAS_CUDA:
        torch.cuda.empty_cache()


def _bench(benchmark, config: str, backend: str, dtype: torch.dtype, batch: int,
           device: torch.device) -> None:
    ok, why = backends.backend_status(backend, device)
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable: {why}")
    try:
        chosen = resolved_ops(backend, device)
    except Exception as e:  # SkipRow: an op this backend cannot run here
        pytest.skip(str(e))
    model = _model(config, device, dtype)
    model.set_backend(backend)
    inputs = random_inputs((batch, 3, IMG_SIZE, IMG_SIZE), count=2 if device.type == "cuda"
                           else 1, device=device, dtype=dtype)

    def forward(x):
        with torch.no_grad():
            return model(x)

    flops = _flops_per_image(config) * batch
    depth, fov = run_benchmark(benchmark, forward, inputs, device, flops=flops,
                               rounds=None if device.type == "cuda" else 1)
    assert depth.shape == (batch, 1, IMG_SIZE, IMG_SIZE)
    assert torch.isfinite(depth).all() and torch.isfinite(fov).all()
    benchmark.extra_info.update({"config": config, "backend": backend, "ops": chosen,
                                 "batch": batch, "dtype": str(dtype).replace("torch.", ""),
                                 "gflop": flops / 1e9})


def test_model_reference_cpu(benchmark):
    _bench(benchmark, "tiny", "reference", torch.float32, 1, torch.device("cpu"))


def test_model_fast_cpu():
    pytest.skip("on a CPU the fast path is the reference for every op (auto), or Triton in its "
                "interpreter, far too slow for a whole model; see the op benchmarks")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("backend,dtype", [
    ("reference", torch.float32), ("reference", torch.bfloat16), ("auto", torch.bfloat16),
    ("triton", torch.bfloat16), ("cuda", torch.bfloat16)],
    ids=["reference-fp32", "reference-bf16", "auto-bf16", "triton-bf16", "cuda-bf16"])
def test_model_gpu(benchmark, backend, dtype, batch):
    if dtype == torch.float32 and batch > 1:
        pytest.skip("fp32 reference timed at batch 1 only (seconds per forward at batch 8)")
    _bench(benchmark, "official", backend, dtype, batch, torch.device("cuda"))
