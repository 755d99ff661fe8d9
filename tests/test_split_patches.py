"""split_patches: the Triton kernel (interpreter on CPU), the CUDA kernel's arithmetic (on the
host, when nvcc is installed) and, on a GPU, the Triton and CUDA kernels vs the reference.

Tolerances: the fused kernels compute in float32 and round once at the store, while the
reference normalises in float32, casts to ``out_dtype`` and then resizes and pools in that dtype
(the official order). float32: 2e-6 absolute on values in [-1, 1]. Reduced precision: within half
an ulp (plus float32 noise) of the float32 reference, i.e. correctly rounded, and within 2 ulps
at 1.0 of the same-dtype reference (which rounds up to three times).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from depthpro_fast import ops
from depthpro_fast.ops.split_patches import split_patches_reference
from depthpro_fast.tolerances import SPLIT_FP32_ATOL
from tests.conftest import HAS_CUDA, poison_, requires_triton

FP32_ATOL = SPLIT_FP32_ATOL  # shared with kernel qualification
KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at the magnitude of ``x`` (float32 in, float32 out)."""
    info = torch.finfo(dtype)
    _, exp = torch.frexp(x.float().abs())
    return torch.ldexp(torch.full_like(x, info.eps, dtype=torch.float32), exp - 1).clamp_min(
        info.tiny * info.eps)


def assert_close_to_reference(out: torch.Tensor, image: torch.Tensor, prenormalized: bool,
                              out_dtype: torch.dtype | None) -> None:
    ref = split_patches_reference(image, prenormalized=prenormalized, out_dtype=out_dtype)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any(), "unwritten (NaN-poisoned) or NaN outputs"
    ref32 = split_patches_reference(image, prenormalized=prenormalized,
                                    out_dtype=torch.float32).to(out.device)
    o = out.float()
    if out.dtype == torch.float32:
        err = (o - ref32).abs().max().item()
        assert err <= FP32_ATOL, err
        return
    # correctly rounded from float32 (half an ulp, plus float32-level noise) ...
    err = (o - ref32).abs() - 0.5 * ulp(ref32, out.dtype) - 1e-6
    assert err.max().item() <= 0, err.max().item()
    # ... and within 2 ulps (at 1, the scale of the inputs) of the same-dtype reference, whose
    # roundings of the inputs carry through the pyramid's means
    err = (o - ref.float().to(out.device)).abs().max().item()
    assert err <= 2 * torch.finfo(out.dtype).eps, err


def random_image(b: int, h: int, w: int, dtype: torch.dtype, *, prenormalized: bool = False,
                 seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        x = torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)
    else:
        x = torch.rand(b, 3, h, w, generator=g)
        x = (x * 2 - 1 if prenormalized else x).to(dtype)
    return x.to(device)


@pytest.fixture
def poisoned_triton_output(monkeypatch):
    """The Triton op's output buffer starts NaN-filled, so unwritten elements fail the test."""
    import depthpro_fast.triton.split_patches as mod

    monkeypatch.setattr(mod, "_alloc", lambda *a, **k: poison_(torch.empty(*a, **k)))


# (B, H, W, image dtype, prenormalized, out_dtype); each case costs seconds in the interpreter
CASES = [
    (1, 301, 457, torch.float32, False, None),
    (2, 1536, 1536, torch.float32, True, None),  # what forward() receives: no resize
    (1, 1536, 1536, torch.uint8, False, torch.float16),
    (1, 7, 5, torch.float16, False, torch.float16),  # tiny: 300x upsampling
]


@requires_triton
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}-pre{c[4]}"
                         f"-{c[5]}".replace("torch.", ""))
def test_triton_matches_reference(case, poisoned_triton_output):
    b, h, w, dtype, pre, out_dtype = case
    image = random_image(b, h, w, dtype, prenormalized=pre, seed=h * w % 1000)
    out = ops.split_patches(image, prenormalized=pre, out_dtype=out_dtype, backend="triton")
    assert_close_to_reference(out, image, pre, out_dtype)


@requires_triton
def test_triton_large_uint8_photo_hwc(poisoned_triton_output):
    """A 4000x3000 (W x H) uint8 photo, 2.6x downscaling on both axes, given as an HWC array
    viewed as (1, 3, H, W) without a copy (what a numpy image becomes)."""
    g = torch.Generator().manual_seed(7)
    hwc = torch.randint(0, 256, (3000, 4000, 3), generator=g, dtype=torch.uint8)
    image = hwc.permute(2, 0, 1).unsqueeze(0)
    assert not image.is_contiguous()
    out = ops.split_patches(image, backend="triton")
    assert_close_to_reference(out, image, False, None)


def test_pyramid_levels_are_the_pooling_the_kernels_use():
    """Spec §2.1: interpolate(0.5) = 2x2 mean, interpolate(0.25) = mean of the central 2x2."""
    x = torch.rand(1, 3, 1536, 1536, dtype=torch.float64)
    half = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
    quarter = F.interpolate(x, scale_factor=0.25, mode="bilinear", align_corners=False)
    mean2 = (x[..., 0::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 4
    central = (x[..., 1::4, 1::4] + x[..., 1::4, 2::4] + x[..., 2::4, 1::4]
               + x[..., 2::4, 2::4]) / 4
    torch.testing.assert_close(half, mean2, rtol=0, atol=1e-15)
    torch.testing.assert_close(quarter, central, rtol=0, atol=1e-15)


@requires_triton
def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from depthpro_fast.triton.split_patches import split_patches_triton

    with FakeTensorMode():
        image = torch.empty(2, 3, 301, 457, dtype=torch.uint8)
        out = split_patches_triton(image)
        assert out.shape == (70, 3, 384, 384) and out.dtype == torch.float32
        out = split_patches_triton(image.float(), out_dtype=torch.float16)
        assert out.dtype == torch.float16


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
def test_bad_inputs_raise_clear_errors(backend):
    good = torch.rand(1, 3, 8, 8)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.split_patches(good.numpy(), backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        ops.split_patches(good.to(torch.int32), backend=backend)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ops.split_patches(torch.rand(1, 4, 8, 8), backend=backend)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ops.split_patches(torch.rand(3, 8, 8), backend=backend)
    with pytest.raises(ValueError, match="empty"):
        ops.split_patches(torch.rand(0, 3, 8, 8), backend=backend)
    with pytest.raises(ValueError, match="prenormalized"):
        ops.split_patches(good.to(torch.uint8), prenormalized=True, backend=backend)
    with pytest.raises(TypeError, match="out_dtype"):
        ops.split_patches(good, out_dtype=torch.int8, backend=backend)


# --------------------------------------------------------------------------------------------
# The CUDA kernel's arithmetic, run on the host (its per-pixel code is __host__ __device__).
# --------------------------------------------------------------------------------------------

HOST_HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "split_patches.cu"
using namespace depthpro_fast::split_patches;
template <typename Tin, typename Tout>
int run(Params p, const char* in, const char* out) {
  std::vector<Tin> src(p.batch * 3 * p.height * p.width);
  FILE* f = fopen(in, "rb");
  if (!f || fread(src.data(), sizeof(Tin), src.size(), f) != src.size()) return 3;
  fclose(f);
  std::vector<Tout> dst((size_t)kWindowsPerImage * p.batch * 3 * kWindow * kWindow);
  const bool identity = p.height == kImage && p.width == kImage;
  for (int win = 0; win < kWindowsPerImage; ++win)
    for (int64_t b = 0; b < p.batch; ++b)
      for (int y = 0; y < kWindow; ++y)
        for (int x = 0; x < kWindow; ++x)
          if (identity) split_pixel<Tin, Tout, true>(src.data(), dst.data(), p, win, b, y, x);
          else split_pixel<Tin, Tout, false>(src.data(), dst.data(), p, win, b, y, x);
  f = fopen(out, "wb");
  fwrite(dst.data(), sizeof(Tout), dst.size(), f);
  fclose(f);
  return 0;
}
int main(int argc, char** argv) {
  // in_dtype (0 uint8, 1 float32) out_dtype (1 float32, 2 float16) B H W scale_h scale_w
  // norm_mul norm_add in out; the image is contiguous
  if (argc != 12) return 2;
  Params p{};
  const int in_dtype = atoi(argv[1]), out_dtype = atoi(argv[2]);
  p.batch = atoll(argv[3]); p.height = atoll(argv[4]); p.width = atoll(argv[5]);
  p.scale_h = strtof(argv[6], nullptr); p.scale_w = strtof(argv[7], nullptr);
  p.norm_mul = strtof(argv[8], nullptr); p.norm_add = strtof(argv[9], nullptr);
  p.stride_w = 1; p.stride_h = p.width; p.stride_c = p.height * p.width;
  p.stride_b = 3 * p.stride_c;
  if (in_dtype == 0 && out_dtype == 1) return run<uint8_t, float>(p, argv[10], argv[11]);
  if (in_dtype == 1 && out_dtype == 1) return run<float, float>(p, argv[10], argv[11]);
  if (in_dtype == 1 && out_dtype == 2) return run<float, __half>(p, argv[10], argv[11]);
  return 2;
}
"""


@pytest.fixture(scope="module")
def host_split(tmp_path_factory):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    d = tmp_path_factory.mktemp("split_host")
    (d / "harness.cu").write_text(HOST_HARNESS)
    subprocess.run([nvcc, "-std=c++17", "-O2", "-I", str(KERNELS), str(d / "harness.cu"), "-o",
                    str(d / "harness")], check=True, capture_output=True)
    return d


@pytest.mark.parametrize("case", [(1, 301, 457, torch.float32, torch.float32),
                                  (1, 1536, 1536, torch.float32, torch.float16),
                                  (2, 600, 900, torch.uint8, torch.float32)],
                         ids=["301x457-f32", "1536-f16out", "600x900-u8-B2"])
def test_cuda_kernel_arithmetic_on_host(host_split, case):
    import numpy as np

    from depthpro_fast.triton.split_patches import normalization, resize_scale

    b, h, w, dtype, out_dtype = case
    image = random_image(b, h, w, dtype, seed=h + w)
    image.numpy().tofile(host_split / "in.bin")
    mul, add = normalization(dtype, False)
    codes = {torch.uint8: "0", torch.float32: "1", torch.float16: "2"}
    subprocess.run([str(host_split / "harness"), codes[dtype], codes[out_dtype], str(b), str(h),
                    str(w), repr(resize_scale(h)), repr(resize_scale(w)), repr(mul), repr(add),
                    str(host_split / "in.bin"), str(host_split / "out.bin")], check=True)
    np_dtype = np.float32 if out_dtype == torch.float32 else np.float16
    out = torch.from_numpy(np.fromfile(host_split / "out.bin", dtype=np_dtype))
    assert_close_to_reference(out.reshape(35 * b, 3, 384, 384), image, False, out_dtype)


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------

def _cuda_backend_or_skip(backend: str) -> None:
    if backend == "cuda":
        from depthpro_fast import _ext

        if not _ext.has_op("split_patches"):
            pytest.skip(f"CUDA extension without split_patches: {_ext.unavailable_reason()}")


GPU_CASES = [(2, 301, 457, torch.float32, False, dt) for dt in (torch.float32, torch.float16,
                                                                   torch.bfloat16)] + [
    (2, 1536, 1536, torch.bfloat16, True, None),
    (2, 1536, 1536, torch.float16, True, None),
    (1, 3000, 4000, torch.uint8, False, torch.bfloat16),
    (3, 2000, 1000, torch.uint8, False, torch.float32),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_matches_reference(backend, case):
    _cuda_backend_or_skip(backend)
    b, h, w, dtype, pre, out_dtype = case
    image = random_image(b, h, w, dtype, prenormalized=pre, seed=h * w % 997, device="cuda")
    # poison the caching allocator's free memory so stale values would show
    poison_(torch.empty(35 * b * 3 * 384 * 384, dtype=torch.float32, device="cuda"))
    out = ops.split_patches(image, prenormalized=pre, out_dtype=out_dtype, backend=backend)
    assert_close_to_reference(out, image, pre, out_dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_writes_every_element(backend):
    """Fill the caching allocator's free blocks with NaN first, so stale memory would show."""
    _cuda_backend_or_skip(backend)
    image = random_image(2, 301, 457, torch.float16, seed=3, device="cuda")
    for _ in range(2):
        poison_(torch.empty(70 * 3 * 384 * 384, dtype=torch.float16, device="cuda"))
        out = ops.split_patches(image, backend=backend)
        assert not out.isnan().any()
