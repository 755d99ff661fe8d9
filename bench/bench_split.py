"""split_patches micro-benchmarks: image -> the 35 pyramid windows per image.

The model's call: a normalised (B, 3, 1536, 1536) image in the run dtype, ``prenormalized=True``.
Also a raw uint8 1080p image (normalise + resize to 1536 + pyramid + windows in one op). The op is
memory-bound: reported as GB/s of (input read once + windows written once).
"""

from __future__ import annotations

import pytest
import torch

from bench.conftest import implementation_or_skip, nbytes, requires_cuda, run_benchmark
from depthpro_fast.bench.timing import random_inputs
from depthpro_fast.ops.split_patches import split_patches_reference

CPU = torch.device("cpu")


def _inputs(kind: str, batch: int, dtype: torch.dtype, device: torch.device, count: int):
    if kind == "prenormalized":
        return random_inputs((batch, 3, 1536, 1536), count=count, device=device, dtype=dtype)
    gen = torch.Generator(device="cpu").manual_seed(1)
    return [torch.randint(0, 256, (batch, 3, 1080, 1920), generator=gen,
                          dtype=torch.uint8).to(device) for _ in range(count)]


def _bench(benchmark, name: str, kind: str, batch: int, dtype: torch.dtype,
           device: torch.device) -> None:
    # the interpreter would take minutes for 35 x 3 x 384^2 outputs: never "tiny"
    fn = implementation_or_skip("split_patches", name, device, tiny=False)
    inputs = _inputs(kind, batch, dtype, device, count=2 if device.type == "cuda" else 1)
    kwargs = {"prenormalized": kind == "prenormalized", "out_dtype": dtype}

    def call(image):
        return fn(image, **kwargs)

    out = call(inputs[0])
    ref = split_patches_reference(inputs[0], **kwargs)
    assert out.shape == ref.shape == (35 * batch, 3, 384, 384)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol), f"{name} is wrong"
    run_benchmark(benchmark, call, inputs, device, bytes_moved=nbytes(inputs[0], ref))
    benchmark.extra_info.update({"impl": name, "input": kind, "batch": batch,
                                 "dtype": str(dtype).replace("torch.", "")})


@pytest.mark.parametrize("kind", ["prenormalized", "uint8"])
def test_split_cpu(benchmark, kind):
    _bench(benchmark, "reference", kind, 1, torch.float32, CPU)


def test_split_triton_interpreter_cpu():
    pytest.skip("split_patches' output (35 x 3 x 384 x 384 per image) is too large for the "
                "Triton interpreter on a CPU; the GPU benchmarks time the Triton kernel")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("kind", ["prenormalized", "uint8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", ["reference", "triton", "cuda"])
def test_split_gpu(benchmark, name, dtype, kind, batch):
    _bench(benchmark, name, kind, batch, dtype, torch.device("cuda"))
