"""merge_patches micro-benchmarks: window tokens -> stitched feature maps (the official crop).

Level 0: 5 x 5 windows per image, 3 tokens cropped at interior borders -> 96 x 96 maps; level 1:
3 x 3 windows, 6 tokens -> 48 x 48. Tokens come as the ViT emits them, (n, 577, C), class token
first. Memory-bound: reported as GB/s of (kept tokens read once + the map written once).
"""

from __future__ import annotations

import pytest
import torch

from bench.conftest import HAS_CUDA, implementation_or_skip, nbytes, requires_cuda, run_benchmark
from depthpro_fast.bench.timing import random_inputs
from depthpro_fast.ops.merge_patches import merge_patches_reference

CPU = torch.device("cpu")
LEVELS = {"level0": (5, 3), "level1": (3, 6)}  # grid, padding


def _bench(benchmark, name: str, level: str, batch: int, channels: int, dtype: torch.dtype,
           device: torch.device, tiny: bool) -> None:
    fn = implementation_or_skip("merge_patches", name, device, tiny=tiny)
    grid, padding = LEVELS[level]
    inputs = random_inputs((grid * grid * batch, 577, channels), device=device, dtype=dtype,
                           count=2 if device.type == "cuda" else 1, low=-2.0, high=2.0)
    kwargs = {"batch_size": batch, "grid": grid, "padding": padding, "blend": 0,
              "channels_last": False}  # the arguments ops.merge_patches passes

    def call(tokens):
        return fn(tokens, **kwargs)

    out = call(inputs[0])
    ref = merge_patches_reference(inputs[0], **kwargs)
    assert out.shape == ref.shape
    assert torch.equal(out, ref), f"{name} merge differs from the reference (a copy is exact)"
    run_benchmark(benchmark, call, inputs, device, bytes_moved=2 * nbytes(ref))
    benchmark.extra_info.update({"impl": name, "level": level, "batch": batch,
                                 "channels": channels, "dtype": str(dtype).replace("torch.", "")})


@pytest.mark.parametrize("level", list(LEVELS))
def test_merge_cpu(benchmark, level):
    # the tiny model's final width (128 channels)
    _bench(benchmark, "reference", level, 1, 128, torch.float32, CPU, tiny=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_merge_triton_interpreter_cpu(benchmark, dtype):
    if HAS_CUDA:
        pytest.skip("the GPU benchmarks time Triton on the device")
    _bench(benchmark, "triton", "level1", 1, 8, dtype, CPU, tiny=True)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("level", list(LEVELS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", ["reference", "triton", "cuda"])
def test_merge_gpu(benchmark, name, dtype, level, batch):
    _bench(benchmark, name, level, batch, 1024, dtype, torch.device("cuda"), tiny=False)
