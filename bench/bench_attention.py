"""Attention micro-benchmarks: our reference and kernels, with PyTorch SDPA backends as peers.

q, k, v are strided views into a packed (B, N, 3, H, D) qkv tensor, exactly as the model hands
them to ``ops.attention``. One call costs 4 * B * H * N^2 * D FLOPs (QK^T and PV).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import HAS_CUDA, implementation_or_skip, requires_cuda, run_benchmark
from depthpro_fast.ops.attention import attention_reference

CPU = torch.device("cpu")


def packed_qkv(b: int, h: int, n: int, d: int, *, count: int, device: torch.device,
               dtype: torch.dtype, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """``count`` different random (q, k, v) triples, views of packed qkv GEMM outputs."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(count):
        qkv = torch.randn(b, n, 3, h, d, generator=gen).to(device=device, dtype=dtype)
        out.append(tuple(qkv[:, :, i].transpose(1, 2) for i in range(3)))
    return out


def attention_flops(b: int, h: int, n: int, d: int) -> float:
    return 4.0 * b * h * n * n * d


def _sdpa(backend_name: str | None):
    """SDPA restricted to one backend (None: PyTorch's choice)."""

    def run(q, k, v, scale):
        if backend_name is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name, None)
        if backend is None:
            pytest.skip(f"this torch has no SDPA backend {backend_name}")
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    return run


def _impl(name: str, device: torch.device, tiny: bool):
    if name == "reference":
        return attention_reference
    if name.startswith("sdpa"):
        return _sdpa({"sdpa": None, "sdpa-flash": "FLASH_ATTENTION",
                      "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                      "sdpa-math": "MATH"}[name])
    return implementation_or_skip("attention", name, device, tiny=tiny)


def _bench(benchmark, name: str, shape: tuple[int, int, int, int], dtype: torch.dtype,
           device: torch.device, tiny: bool) -> None:
    fn = _impl(name, device, tiny)
    b, h, n, d = shape
    scale = d ** -0.5
    inputs = packed_qkv(b, h, n, d, count=2 if device.type == "cuda" else 1, device=device,
                        dtype=dtype)

    def call(qkv):
        return fn(*qkv, scale)

    # a fast result is worth timing only if it is right (loose: half-precision inputs)
    try:
        out = call(inputs[0])
    except RuntimeError as e:
        if name.startswith("sdpa"):  # e.g. "No available kernel" for this dtype or layout
            pytest.skip(f"{name} cannot run this case: {str(e).splitlines()[0]}")
        raise
    q, k, v = inputs[0]
    ref = attention_reference(q.float(), k.float(), v.float(), scale)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert out.shape == ref.shape
    assert torch.allclose(out.float(), ref, atol=tol, rtol=tol), f"{name} output is wrong"
    run_benchmark(benchmark, call, inputs, device, flops=attention_flops(*shape))
    benchmark.extra_info.update({"impl": name, "shape": list(shape),
                                 "dtype": str(dtype).replace("torch.", "")})


# ---- CPU-safe ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["reference", "sdpa-math"])
def test_attention_cpu(benchmark, name):
    # (B, H, N, D) = 2 windows, 2 heads of 64: the tiny model's shape, 577 tokens
    _bench(benchmark, name, (2, 2, 577, 64), torch.float32, CPU, tiny=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_triton_interpreter_cpu(benchmark, dtype):
    if HAS_CUDA:
        pytest.skip("the GPU benchmarks time Triton on the device")
    _bench(benchmark, "triton", (1, 1, 65, 64), dtype, CPU, tiny=True)


# ---- GPU -------------------------------------------------------------------------------------

GPU_IMPLS = ["reference", "triton", "cuda", "sdpa", "sdpa-flash", "sdpa-efficient",
             "sdpa-cudnn", "sdpa-math"]
# the patch encoder (35 windows per image; 8 images), and the image / FOV encoders (1 window)
GPU_SHAPES = [(35, 16, 577, 64), (280, 16, 577, 64), (1, 16, 577, 64)]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"B{s[0]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", GPU_IMPLS)
def test_attention_gpu(benchmark, name, dtype, shape):
    _bench(benchmark, name, shape, dtype, torch.device("cuda"), tiny=False)
